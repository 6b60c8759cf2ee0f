"""Readable terminal summaries (rich tables) of plans, footprints and search candidates."""

from __future__ import annotations

from collections import Counter, defaultdict

from rich.console import Console
from rich.table import Table

from .accounting import Footprint, layer_bytes
from .model import LayerInfo
from .plan import LayerConfig
from .units import format_size

KIND_ORDER = ["q", "k", "v", "o", "gate", "up", "down", "lm_head"]


def footprint_table(fp: Footprint, budget: int | None = None, title: str = "Memory") -> Table:
    table = Table(title=title)
    table.add_column("part")
    table.add_column("bytes", justify="right")
    table.add_column("size", justify="right")
    rows = [("block linears", fp.layer_weights), ("embeddings, norms, head", fp.other_weights),
            ("KV cache", fp.kv_cache), ("activation workspace", fp.workspace),
            ("runtime overhead", fp.runtime_overhead)]
    for label, value in rows:
        table.add_row(label, f"{value:,}", format_size(value))
    table.add_row("[bold]total[/bold]", f"[bold]{fp.total:,}[/bold]", format_size(fp.total))
    if budget is not None:
        table.add_row("budget", f"{budget:,}", format_size(budget))
    return table


def kinds_table(layers: list[LayerInfo], configs: dict[str, LayerConfig],
                title: str = "Formats per layer kind") -> Table:
    """Rows: layer kinds; columns: formats; cells: how many layers; plus average bits/weight."""
    counts: dict[str, Counter] = defaultdict(Counter)
    bits_sum: dict[str, float] = defaultdict(float)
    params: dict[str, int] = defaultdict(int)
    for layer in layers:
        cfg = configs[layer.name]
        counts[layer.kind][cfg.short()] += 1
        bits_sum[layer.kind] += 8 * layer_bytes(layer.out_features, layer.in_features, cfg)
        params[layer.kind] += layer.n_params
    formats = sorted({f for c in counts.values() for f in c}, key=_format_sort_key)
    table = Table(title=title)
    table.add_column("kind")
    for f in formats:
        table.add_column(f, justify="right")
    table.add_column("bits/weight", justify="right")
    kinds = [k for k in KIND_ORDER if k in counts] + sorted(set(counts) - set(KIND_ORDER))
    for kind in kinds:
        table.add_row(kind, *[str(counts[kind].get(f, "")) for f in formats],
                      f"{bits_sum[kind] / params[kind]:.2f}")
    total_bits = sum(bits_sum.values()) / max(sum(params.values()), 1)
    table.add_row("[bold]all[/bold]", *[str(sum(c.get(f, 0) for c in counts.values()))
                                        for f in formats], f"[bold]{total_bits:.2f}[/bold]")
    return table


def _format_sort_key(label: str):
    head = label.split()[0]
    return (int(head[:-1]) if head.endswith("b") and head[:-1].isdigit() else 16, label)


def candidates_table(candidates, chosen_label: str) -> Table:
    table = Table(title="Candidates, measured on held-out calibration windows")
    for col in ("candidate", "total", "tok/s", "predicted Δloss", "KL (level 2)", "KL", "ppl",
                "windows", ""):
        table.add_column(col, justify="left" if col == "candidate" else "right")
    for c in candidates:
        m = c.measured or {}
        stopped = m.get("stopped_early")
        table.add_row(
            c.label, format_size(c.footprint.total),
            "" if c.decode is None else f"{c.decode.tokens_per_s:.1f}",
            "" if c.predicted is None else f"{c.predicted:.4f}",
            "" if c.kl_fast is None else f"{c.kl_fast:.4f}",
            "" if m.get("kl") is None else f"{m['kl']:.4f}",
            "" if m.get("ppl") is None else f"{m['ppl']:.2f}",
            "" if m.get("windows") is None else (f"{m['windows']}" + (" (ASHA)" if stopped else "")),
            "[green]chosen[/green]" if c.label == chosen_label else "",
        )
    return table


def print_tables(*tables: Table, console: Console | None = None) -> None:
    console = console or Console()
    for table in tables:
        console.print(table)


def devices_table(profiles: dict, aliases: dict[str, str]) -> Table:
    """One row per device profile: memory, what a model may use, bandwidth, peak, formats."""
    table = Table(title="Device profiles (bundled, in autocompress/hw_profiles/)")
    for col in ("name", "kind", "memory", "usable", "bandwidth", "f16/bf16 peak", "2:4",
                "fast formats", "aliases"):
        table.add_column(col, justify="right" if col in ("memory", "usable", "bandwidth",
                                                          "f16/bf16 peak") else "left")
    by_target: dict[str, list[str]] = defaultdict(list)
    for alias, target in aliases.items():
        by_target[target].append(alias)
    for name, profile in profiles.items():
        peaks = profile.compute.peak_tflops
        peak = peaks.get("f16") or peaks.get("bf16") or peaks.get("f32")
        table.add_row(
            name, profile.kind, format_size(profile.memory.capacity),
            format_size(profile.memory.usable_bytes), f"{profile.memory.bandwidth_gbps:g} GB/s",
            f"{peak:g} TFLOPS", "yes" if profile.compute.sparse_2_4 else "no",
            " ".join(sorted(profile.formats, key=_format_name_key)),
            ", ".join(sorted(by_target.get(name, []))))
    return table


def _format_name_key(name: str) -> tuple:
    base = name.split("+")[0]
    return (base[0] == "q", int(base[1:]) if base[0] == "q" else 0, name)


def decode_table(estimate, device: str, title: str | None = None) -> Table:
    """Predicted decode time per token, by part."""
    table = Table(title=title or f"Predicted decode on {device} (batch 1, context "
                                 f"{estimate.context})")
    table.add_column("part")
    table.add_column("ms/token", justify="right")
    if "llamacpp profile" in estimate.sources:  # relative to the profile's reference file
        parts = (("the profile's reference file, this plan's embedding", estimate.overhead_s),
                 ("this plan's block linears against the reference type", estimate.layers_s))
    else:
        parts = (("block linears", estimate.layers_s), ("head", estimate.head_s),
                 ("KV cache", estimate.kv_s), ("per-block work, dispatch", estimate.overhead_s))
    for label, seconds in parts:
        table.add_row(label, f"{seconds * 1e3:+.3f}" if seconds < 0 else f"{seconds * 1e3:.3f}")
    table.add_row("[bold]total[/bold]", f"[bold]{estimate.seconds_per_token * 1e3:.3f}[/bold]")
    table.add_row("tokens/s", f"{estimate.tokens_per_s:.1f}")
    if estimate.bytes_per_token:
        table.add_row("bytes read per token", format_size(estimate.bytes_per_token))
    return table
