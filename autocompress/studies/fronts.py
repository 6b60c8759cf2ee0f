"""`study fronts`: one model's quality x memory x predicted-latency front on several devices.

For every device profile the exact proxy front is solved with the bytes that device's engine
holds each format in (the search's level 1 with the device's byte row), at ``points`` memory
levels from the smallest plan to the largest; every plan on a front is measured (KL to the
uncompressed model on held-out windows of the calibration text; a plan two devices share is
measured once) and its decode speed predicted by the device's latency model. Then, at one
memory level inside every device's range, each device's optimum is solved again and their
plans compared layer by layer (bits per weight as each device holds them: a heat map).
With ``min_tps`` (a decode speed each device must reach, its latency model's prediction)
every front and the equal-memory optima are solved under that limit too, so that a device
whose engine decodes some formats slowly trades them for others.

Outputs in ``out``: fronts.json (protocol, every point, the comparison at equal memory),
fronts.csv, figures/front-DEVICE.png (KL against memory, coloured by predicted tokens/s),
figures/overlay.png (every device's front) and figures/formats.png (layers x devices). Points
are written as they are measured: a rerun with ``resume`` measures only what is missing.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..accounting import model_footprint
from ..data import calibration_data
from ..errors import AutocompressError
from ..hardware.memory import held_layer_bytes
from ..hardware.profile import load_profile
from ..io_utils import atomic_save_figure, atomic_write_text
from ..model import LoadedModel
from ..search.optuna_level import plan_signature
from ..search.problem import Problem
from ..search.space import SearchSpace
from ..search.speed import DeviceDecode
from ..sensitivity.build import build_table, make_proxy
from .store import StudyFile

ENTRIES = ("fronts.json", "fronts.csv", "figures", "sensitivity.cache.json")


@dataclass(frozen=True)
class FrontsSettings:
    devices: tuple[str, ...]
    space: str = "joint"
    points: int = 6
    eval_windows: int = 4
    calib_windows: int = 8
    window_len: int = 512
    context: int = 2048
    calib_text: str | None = None
    proxy: str = "fisher"
    # device -> the decode tokens/s its plans must reach (devices not named: no limit)
    min_tps: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        for device, tps in self.min_tps:
            if device not in self.devices:
                raise AutocompressError(f"--min-tps names {device!r}, which is not among "
                                        f"--devices ({', '.join(self.devices)})")
            if not tps > 0:
                raise AutocompressError(f"--min-tps for {device} must be positive, got {tps}")


def run_fronts(loaded: LoadedModel, settings: FrontsSettings, out: Path, resume: bool = False,
               progress: bool = True, log=print) -> dict:
    """Run the study into ``out`` (made by the caller); returns what fronts.json holds."""
    from tqdm import tqdm

    from ..compress.apply import hessian_layers
    from ..search.measure import PlanMeter

    if len(set(settings.devices)) < 2:
        raise AutocompressError("a fronts study compares devices: give at least two")
    profiles = {name: load_profile(name) for name in settings.devices}  # unknown: said now
    space = SearchSpace.load(settings.space)
    calib = calibration_data(loaded.tokenizer, settings.calib_text, settings.calib_windows,
                             settings.eval_windows, settings.window_len)
    protocol = {"model": loaded.identity.name, "model_hash": loaded.identity.content_hash,
                **asdict(settings), "devices": list(settings.devices),
                "min_tps": dict(settings.min_tps),
                "calib_digest": calib.digest,
                "measure": f"KL to the uncompressed model on the last {settings.eval_windows} "
                           f"held-out windows of {settings.window_len} tokens of the calibration "
                           "text; plans built with parallel calibration",
                "speed": "each device profile's latency model: batch-1 decode at the context"}
    results = StudyFile(out / "fronts.json", protocol, "measured", resume)
    table = build_table(loaded, space, make_proxy(settings.proxy), calib.calib, calib.digest,
                        cache=out / "sensitivity.cache.json", progress=progress, log=log)
    tables = space.table_configs(loaded)
    groups = space.decision_groups(loaded.layers)
    held = {name: _held_bytes(loaded, table, profile) for name, profile in profiles.items()}
    decodes = {name: DeviceDecode(loaded, profile, settings.context)
               for name, profile in profiles.items()}
    min_tps = dict(settings.min_tps)
    # capacity: the largest plan's (the whole front); the device's speed limit, if any
    problems = {name: Problem(table, groups, int(h.max(axis=1).sum()), size=h,
                              limits=_speed_limit(decodes[name], table, groups,
                                                  min_tps.get(name)))
                for name, h in held.items()}

    fronts = {}
    for name, problem in problems.items():
        decode = decodes[name]
        fronts[name] = [_point(loaded, problem, choice, fraction, tables, decode, settings,
                               profiles[name])
                        for fraction, choice in problem.front(settings.points)]
        if not fronts[name] and name in min_tps:
            raise AutocompressError(f"no plan of the space decodes at {min_tps[name]:g} "
                                    f"tokens/s on {name} (its latency model): lower its "
                                    "--min-tps")
    plans = {p["signature"]: p["configs"] for front in fronts.values() for p in front}
    todo = [s for s in plans if s not in results.done]
    if todo:
        meter = PlanMeter(loaded, calib.holdout[:settings.eval_windows], calib.calib,
                          fixed=tables, hessian_layers=hessian_layers(loaded.layers,
                                                                      space.for_layer))
        for signature in tqdm(todo, desc="fronts: measuring plans", disable=not progress):
            results.done[signature] = meter.measure(plans[signature])
            results.save()  # each plan kept as it is measured: a rerun resumes after it
    for front in fronts.values():
        for p in front:
            p.update({k: results.done[p["signature"]][k] for k in ("kl", "ppl")})
            del p["configs"]
    results.data["devices"] = fronts
    results.data["equal_memory"] = _equal_memory(loaded, problems, held, fronts, decodes,
                                                  tables)
    results.save()
    atomic_write_text(out / "fronts.csv", _csv(fronts))
    _figures(results.data, out / "figures")
    return results.data


def _speed_limit(decode: DeviceDecode, table, groups, min_tps: float | None) -> tuple:
    return () if min_tps is None else (decode.limit(table, groups, 1.0 / min_tps),)


def _held_bytes(loaded, table, profile) -> np.ndarray:
    """[layers, options]: the bytes ``profile``'s engine holds each option in (level 1's
    byte row on that device; padding 0)."""
    width = max(len(options) for options in table.options)
    return np.array([[held_layer_bytes(layer.out_features, layer.in_features, cfg, profile)
                      for cfg in options] + [0] * (width - len(options))
                     for layer, options in zip(loaded.layers, table.options)], dtype=np.int64)


def _point(loaded, problem, choice, fraction, tables, decode, settings, profile) -> dict:
    configs = problem.configs(choice)
    footprint = model_footprint(loaded, {**configs, **tables}, settings.context, 1,
                                profile.memory.runtime_overhead)
    layer_bytes = problem.layer_bytes(choice)
    total = footprint.total - footprint.layer_weights + layer_bytes
    return {"fraction": round(float(fraction), 4), "signature": plan_signature(configs),
            "layer_bytes": layer_bytes, "total_bytes": int(total),
            "tokens_per_s": decode.estimate({**configs, **tables}).tokens_per_s,
            "predicted_loss": problem.predicted(choice),
            "formats": _format_counts(configs), "configs": configs}


def _format_counts(configs) -> dict[str, int]:
    counts: dict[str, int] = {}
    for cfg in configs.values():
        counts[cfg.short()] = counts.get(cfg.short(), 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _equal_memory(loaded, problems: dict[str, Problem], held: dict[str, np.ndarray],
                  fronts: dict[str, list[dict]], decodes: dict[str, DeviceDecode],
                  tables: dict) -> dict:
    """Every device's optimum at one layer-byte level inside all their ranges: bits per weight
    per layer as each device holds them, and the layers whose formats differ. Under a speed
    limit a device's range starts at its front's smallest plan (a smaller one may be slower
    than the limit allows)."""
    low = max(min(p["layer_bytes"] for p in fronts[name]) if problem.limits else
              problem.min_bytes for name, problem in problems.items())
    high = min(p.capacity for p in problems.values())
    if low > high:
        return {"capacity_bytes": None, "note": "the devices' plan sizes do not overlap"}
    capacity = int((low + high) / 2)
    per_device = {}
    for name, problem in problems.items():
        choice = problem.per_layer(problem.solve(capacity=capacity))
        sizes = held[name][np.arange(len(choice)), choice]
        configs = problem.table.configs(choice)
        per_device[name] = {
            "tokens_per_s": decodes[name].estimate({**configs, **tables}).tokens_per_s,
            "formats": {layer.name: problem.table.options[i][choice[i]].short()
                        for i, layer in enumerate(loaded.layers)},
            "bits_per_weight": {layer.name: round(8 * int(sizes[i]) / layer.n_params, 3)
                                for i, layer in enumerate(loaded.layers)},
            "predicted_loss": float(problem.table.cost_matrix()[np.arange(len(choice)),
                                                                 choice].sum())}
    names = [layer.name for layer in loaded.layers]
    differ = [n for n in names if len({d["formats"][n] for d in per_device.values()}) > 1]
    return {"capacity_bytes": capacity, "devices": per_device, "layers_that_differ": differ}


def _csv(fronts: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["device", "fraction", "total_bytes", "layer_bytes", "tokens_per_s",
                     "predicted_loss", "kl", "ppl", "signature"])
    for device, front in fronts.items():
        for p in front:
            writer.writerow([device, p["fraction"], p["total_bytes"], p["layer_bytes"],
                             f"{p['tokens_per_s']:.4g}", f"{p['predicted_loss']:.6g}",
                             f"{p['kl']:.6g}", f"{p['ppl']:.6g}", p["signature"]])
    return buffer.getvalue()


def _figures(data: dict, directory: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(exist_ok=True)
    model = data["protocol"]["model"]
    fronts = data["devices"]
    for device, front in fronts.items():
        mb = [p["total_bytes"] / 1e6 for p in front]
        fig, ax = plt.subplots(figsize=(6, 4))
        dots = ax.scatter(mb, [p["kl"] for p in front], c=[p["tokens_per_s"] for p in front],
                          cmap="viridis")
        ax.plot(mb, [p["kl"] for p in front], color="grey", lw=0.8, zorder=0)
        fig.colorbar(dots, ax=ax, label="predicted decode, tokens/s")
        _axes(ax, f"{model} on {device}")
        _save(fig, directory / f"front-{device}.png")
    fig, (ax_kl, ax_speed) = plt.subplots(1, 2, figsize=(11, 4))
    for device, front in fronts.items():
        mb = [p["total_bytes"] / 1e6 for p in front]
        ax_kl.plot(mb, [p["kl"] for p in front], marker="o", label=device)
        ax_speed.plot(mb, [p["tokens_per_s"] for p in front], marker="o", label=device)
    _axes(ax_kl, f"{model}: measured quality")
    ax_speed.set_xlabel("memory on the device (MB)")
    ax_speed.set_ylabel("predicted decode (tokens/s)")
    ax_speed.set_title("predicted speed")
    ax_kl.legend(fontsize=8)
    _save(fig, directory / "overlay.png")
    equal = data["equal_memory"]
    if equal.get("capacity_bytes"):
        devices = list(equal["devices"])
        layers = list(equal["devices"][devices[0]]["bits_per_weight"])
        grid = np.array([[equal["devices"][d]["bits_per_weight"][n] for d in devices]
                         for n in layers])
        fig, ax = plt.subplots(figsize=(2 + 1.2 * len(devices), max(3, 0.12 * len(layers))))
        image = ax.imshow(grid, aspect="auto", cmap="magma")
        ax.set_xticks(range(len(devices)), devices, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(layers)), [n.removeprefix("model.") for n in layers], fontsize=5)
        fig.colorbar(image, ax=ax, label="bits per weight as held")
        ax.set_title(f"at {equal['capacity_bytes'] / 1e6:.0f} MB of layers", fontsize=9)
        _save(fig, directory / "formats.png")


def _axes(ax, title: str) -> None:
    ax.set_xlabel("memory on the device (MB)")
    ax.set_ylabel("KL to uncompressed (nats/token)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)
