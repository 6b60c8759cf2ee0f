"""llama.cpp tables: searched GGUF files against llama.cpp's own recipes, as llama.cpp
measures them."""

from __future__ import annotations

import statistics

from .format import Store, _fmt_ppl


def gguf(store: Store, name: str = "gguf.json") -> str:
    data = store.get(name)
    p, entries = data.protocol, data.entries
    rows = ["| plan | file | bits/weight (tensors) | llama.cpp perplexity | KL | `eval` (torch) "
            "perplexity | decode tok/s (predicted) | types |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    n_weights = _gguf_weights(entries)
    for key, e in entries.items():
        if key == "SOURCE":
            continue
        if not key.startswith("search@"):
            label = f"llama.cpp {e.recipe}" + (" + imatrix" if e.imatrix else "")
            rows.append(_gguf_row(label, e, n_weights))
    searched = {k: e for k, e in entries.items() if k.startswith("search@")}
    for e in sorted(searched.values(), key=lambda e: e.file_bytes):
        rows.append(_gguf_row(f"**`search --space gguf`** at {e.recipe}'s bytes "
                              f"({e.search_s / 60:.0f} min)", e, n_weights))
    out = "\n".join(rows)
    if searched:
        out += "\n\n" + _gguf_versus(entries, searched)
    out += _gguf_agreement(entries) + _gguf_speeds(entries) + _gguf_floor(entries)
    settings = sorted({e.settings for e in searched.values()})
    if settings:
        out += (f"\n\nSearched rows: {' / '.join(settings)}; the budget held the search to at "
                "most the recipe's tensor bytes.")
    return out + (f"\n\nProtocol: {p.model}; evaluation {p.eval}; engine {p.engine}; KL to "
                  f"{p.kl_reference}; calibration {p.calibration}; machine {p.machine}.")


def _gguf_floor(entries) -> str:
    """The source file itself in llama.cpp against its own float32 decoding in torch: what
    llama.cpp's kernels add to every row's KL (no requantization at all)."""
    e = entries.get("SOURCE")
    if e is None:
        return ""
    return (f"\n\nFloor: the source file itself ({e.recipe}) run by llama.cpp has KL "
            f"{e.kl:.4f} (perplexity {_fmt_ppl(e.ppl)}) to its float32 decoding in torch on "
            "the same windows, with no weight changed: that much of every row's KL is "
            "llama.cpp's kernels (activations quantized for its dot products), not the plan.")


def _gguf_versus(entries, searched) -> str:
    """At each recipe's file size: the recipe with imatrix against the searched file."""
    rows = ["| at the size of | recipe + imatrix: MB, KL | search: MB, KL | KL change |",
            "| --- | ---: | ---: | ---: |"]
    for e in sorted(searched.values(), key=lambda e: e.file_bytes):
        r = entries.get(f"{e.recipe} imatrix")
        if r is None:
            continue
        rows.append(f"| {e.recipe} | {r.file_bytes / 1e6:.1f}, {r.kl:.4f} | "
                    f"{e.file_bytes / 1e6:.1f}, {e.kl:.4f} | {e.kl / r.kl - 1:+.0%} |")
    return "\n".join(rows)


def _gguf_agreement(entries) -> str:
    """llama.cpp's perplexity of each exported file against `eval`'s of its plan in torch."""
    gaps = [e.ppl / e.torch_ppl - 1 for e in entries.values() if e.torch_ppl is not None]
    if not gaps:
        return ""
    worst = max(gaps, key=abs)
    plans = f"{len(gaps)} plan" + ("s" if len(gaps) > 1 else "")
    return (f"\n\nllama.cpp against `eval`: over {plans}, llama.cpp's perplexity of "
            f"the exported file is within {abs(worst):.1%} of `eval`'s perplexity of the same "
            f"plan in torch (median {statistics.median(abs(g) for g in gaps):.1%}; the same "
            "windows; torch runs the dequantized weights in float32, llama.cpp its own "
            "quantized kernels).")


def _gguf_speeds(entries) -> str:
    """The speed column's protocol, its noise, and how well the profile predicts mixed files."""
    profiles = {e.speed_profile for e in entries.values() if e.speed_profile}
    protocols = {e.speed_protocol for e in entries.values() if e.speed_protocol}
    if not profiles and not protocols:
        return ""
    out = "\n\nDecode speeds: " + ("; ".join(sorted(protocols)) if protocols else
                                   "batch 1, 16-token prompt, 64 tokens, median of 3") + "."
    mixed = [e.decode_tps / e.predicted_tps - 1 for e in entries.values()
             if e.mixed_types and e.decode_tps is not None and e.predicted_tps is not None]
    if profiles:
        out += (f" Predicted: from the llama.cpp speed profile {', '.join(sorted(profiles))} "
                "(`profile --engine llamacpp`: one file per type with every block linear in it, "
                "llama.cpp's fallbacks aside, fitted per weight and stored type).")
    if mixed:
        errors = sorted(abs(m) for m in mixed)
        out += (f" On the {len(mixed)} files whose mixture of stored types no profile file "
                f"had (the recipes' boosted layers, the searched plans), the prediction's "
                f"median error is {statistics.median(errors):.1%} (largest {errors[-1]:.1%}).")
    return out + _speed_noise(entries)


def _speed_noise(entries) -> str:
    """How far apart decode speeds of files with the same types came out: the resolution of
    the speed column on this machine."""
    groups: dict[tuple, list[float]] = {}
    for e in entries.values():
        if e.decode_tps is not None:
            groups.setdefault(tuple(sorted(e.types.items())), []).append(e.decode_tps)
    spreads = [max(v) / min(v) - 1 for v in groups.values() if len(v) > 1]
    if not spreads:
        return ""
    return (f" Files with the same types in every tensor (most recipes with and without "
            f"imatrix; recipes whose rules coincide on this model) decoded up to {max(spreads):.0%} apart "
            f"({len(spreads)} such groups, median spread {statistics.median(spreads):.0%}): "
            "differences in this column smaller than that are noise of this shared 2-core "
            "machine.")


def _gguf_weights(entries) -> int | None:
    """Weights in the file's quantized tensors: recorded by the row, else from a plain Q8_0
    row (34 bytes per 32)."""
    recorded = {e.tensor_weights for e in entries.values() if e.tensor_weights}
    if recorded:
        return recorded.pop()
    e = entries.get("Q8_0")
    return None if e is None else e.tensor_bytes * 32 // 34


def _gguf_row(label: str, e, n_weights: int | None) -> str:
    bpw = "" if not n_weights else f"{8 * e.tensor_bytes / n_weights:.2f}"
    types = ", ".join(f"{t} {n}" for t, n in sorted(e.types.items(), key=lambda kv: -kv[1])
                      if t != "f32")
    speed = "" if e.decode_tps is None else f"{e.decode_tps:.1f}"
    if e.predicted_tps is not None:
        speed += f" ({e.predicted_tps:.1f})"
    torch = "" if e.torch_ppl is None else _fmt_ppl(e.torch_ppl)
    return (f"| {label} | {e.file_bytes / 1e6:.1f} MB | {bpw} | {_fmt_ppl(e.ppl)} | "
            f"{e.kl:.4f} | {torch} | {speed} | {types} |")
