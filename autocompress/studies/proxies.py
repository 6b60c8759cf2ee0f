"""`study proxies`: how well each sensitivity proxy ranks real plans, per option family, and
what its table costs, on one or more models.

For each model, random plans are drawn per option family of the space (quantization, sparse,
2:4, low rank; each tied group takes one of the family's options or, half the time, the
space's most precise option, so that a plan's damage comes from that family), and each plan's
KL to the uncompressed model is measured on held-out windows (once, shared by the proxies).
Each proxy's table is built on the calibration windows (its wall time is its cost) and its
additive prediction (the sum of the plan's table entries) is ranked against the measured KLs:
Spearman and Kendall per family, and over all plans.

Outputs in ``out``: proxies.json (protocol; per model the plans and their KLs, per proxy the
table seconds and the correlations), proxies.csv (one row per model, proxy and family) and
figures/proxies.png (Spearman per family, one panel per model). Measurements and tables are
saved as they finish: a rerun with ``resume`` goes on from there (tables from their cache,
the time each earlier attempt spent on a table credited to its cost: a table interrupted
and resumed costs what it took in all).
"""

from __future__ import annotations

import csv
import io
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import AutocompressError
from ..io_utils import atomic_save_figure, atomic_write_text
from ..model import LoadedModel
from ..plan import LayerConfig
from .store import StudyFile

ENTRIES = ("proxies.json", "proxies.csv", "figures", "tables", "stats")
FAMILIES = ("quantization", "sparse", "2:4", "low rank")
HEARTBEAT_S = 30.0  # how often a table's time so far is saved (what a SIGKILL can lose)


def family_of(cfg: LayerConfig) -> str | None:
    """The option family of a config (None: the float16 identity, in no family)."""
    if cfg.is_low_rank:
        return "low rank"
    if cfg.pattern == "2:4" and cfg.is_pruned:
        return "2:4"
    if cfg.is_pruned:
        return "sparse"
    if cfg.bits < 16 or cfg.is_gguf:
        return "quantization"
    return None


@dataclass(frozen=True)
class ProxiesSettings:
    proxies: tuple[str, ...] = ("fisher", "hessian", "hutchinson")
    space: str = "joint"
    plans_per_family: int = 8
    calib_windows: int = 8
    holdout_windows: int = 4
    window_len: int = 512
    calib_text: str | None = None
    seed: int = 0
    families: tuple[str, ...] = field(default=FAMILIES)


def family_plans(options: list[list[LayerConfig]], groups: list[list[int]], family: str,
                 n: int, rng: np.random.Generator) -> list[list[int]]:
    """``n`` plans (an option index per layer) whose tied groups take one of ``family``'s
    options or (with probability 1/2, and where the group's layers have none: pinned ones)
    their most precise option; [] when no layer has an option of the family."""
    def precise(row: list[LayerConfig]) -> int:
        return max(range(len(row)), key=lambda i: row[i].bits
                   if not (row[i].is_pruned or row[i].is_low_rank) else 0)

    members = [[i for i, cfg in enumerate(options[group[0]]) if family_of(cfg) == family]
               for group in groups]
    open_groups = [g for g, m in enumerate(members) if m]
    if not open_groups:
        return []
    plans = []
    for _ in range(n):
        picks = [int(rng.choice(m)) if m and rng.random() < 0.5 else None for m in members]
        if all(p is None for p in picks):  # every group drew the precise option: force one
            g = open_groups[int(rng.integers(len(open_groups)))]
            picks[g] = int(rng.choice(members[g]))
        choice = [0] * len(options)
        for group, pick in zip(groups, picks):
            option = precise(options[group[0]]) if pick is None else pick
            for index in group:
                choice[index] = option
        plans.append(choice)
    return plans


def _correlations(predicted: list[float], measured: list[float]) -> dict:
    from scipy.stats import kendalltau, spearmanr

    if len(predicted) < 3 or len(set(measured)) < 2 or len(set(predicted)) < 2:
        return {"spearman": None, "kendall": None, "plans": len(predicted)}
    return {"spearman": float(spearmanr(predicted, measured).statistic),
            "kendall": float(kendalltau(predicted, measured).statistic),
            "plans": len(predicted)}


def run_proxies(models: list[str], settings: ProxiesSettings, out: Path, resume: bool = False,
                progress: bool = True, log=print,
                load: Callable[[str], LoadedModel] | None = None) -> dict:
    from ..compress.apply import hessian_layers
    from ..compress.stats_store import StatsStore, stats_key
    from ..data import calibration_data
    from ..search.measure import PlanMeter
    from ..search.space import SearchSpace
    from ..sensitivity.build import build_table, make_proxy

    for name in settings.proxies:
        make_proxy(name)  # an unknown proxy: said before any work
    unknown = [f for f in settings.families if f not in FAMILIES]
    if unknown:
        raise AutocompressError(f"unknown option family {unknown[0]!r}: choose from "
                                f"{', '.join(FAMILIES)}")
    if load is None:
        from ..model import load_model

        load = load_model
    space = SearchSpace.load(settings.space)
    protocol = {"models": list(models), **asdict(settings),
                "plans": "per family, each tied group one of the family's options or (p=1/2) "
                         "the group's most precise option",
                "measured": f"KL to the uncompressed model on the last "
                            f"{settings.holdout_windows} windows of the calibration text",
                "cost": "wall seconds of the proxy's table on this machine"}
    # a resumed study may add models (the finished ones are kept), not change its settings
    results = StudyFile(out / "proxies.json", protocol, "models", resume, extendable=("models",))
    for spec in models:
        entry = results.done.setdefault(spec, {"plans": {}, "proxies": {}})
        log(f"proxies: {spec}")
        loaded = load(spec)
        options = [space.for_layer(layer) for layer in loaded.layers]
        groups = space.decision_groups(loaded.layers)
        rng = np.random.default_rng(settings.seed)
        drawn = {family: family_plans(options, groups, family, settings.plans_per_family, rng)
                 for family in settings.families}
        calib = calibration_data(loaded.tokenizer, settings.calib_text, settings.calib_windows,
                                 settings.holdout_windows, settings.window_len)
        meter = None
        for family, plans in drawn.items():
            for index, choice in enumerate(plans):
                key = f"{family}/{index}"
                if key in entry["plans"]:
                    continue
                # statistics (and the GPTQ / SVD memo beside them) kept in ``out``: a resumed
                # study reads them back instead of taking them again (on a 1.5B model, tens
                # of minutes and gigabytes)
                meter = meter or PlanMeter(loaded, calib.holdout, calib.calib, stats=StatsStore(
                    out / "stats" / _safe(spec), loaded.layers,
                    stats_key(loaded, calib.digest),
                    hessian_layers(loaded.layers, space.for_layer), loaded.placement.device))
                configs = {layer.name: options[l][o]
                           for l, (layer, o) in enumerate(zip(loaded.layers, choice))}
                entry["plans"][key] = {"family": family, "choice": choice,
                                       "kl": meter.measure(configs)["kl"]}
                results.save()
        del meter
        for name in settings.proxies:
            if name in entry["proxies"]:
                continue
            with _timed(entry.setdefault("building", {}), name, results, log) as spent:
                table = build_table(loaded, space, make_proxy(name), calib.calib, calib.digest,
                                    cache=out / "tables" / f"{_safe(spec)}-{name}.cache.json",
                                    progress=progress, log=log)
            record = {"table_s": round(sum(spent), 2), "attempts_s": spent, "families": {}}
            plans = entry["plans"]
            for family in [*settings.families, "all"]:
                keys = [k for k, p in plans.items() if family in ("all", p["family"])]
                record["families"][family] = _correlations(
                    [table.predicted(plans[k]["choice"])[0] for k in keys],
                    [plans[k]["kl"] for k in keys])
            entry["proxies"][name] = record
            del entry["building"][name]
            results.save()
        del loaded
    atomic_write_text(out / "proxies.csv", _csv(results.done))
    _figure(results.data, out / "figures" / "proxies.png")
    return results.data


@contextmanager
def _timed(building: dict, name: str, results: StudyFile, log):
    """Time a table's build, its attempts' seconds kept in ``building[name]`` and saved every
    HEARTBEAT_S and at the end, so that a killed build's time counts when it is resumed.
    Yields the list of attempts' seconds (final once the block ends)."""
    spent = building.setdefault(name, [])
    if spent:
        log(f"table {name}: {sum(spent):.0f} s of {len(spent)} earlier attempt(s) credited")
    spent.append(0.0)
    start, stop = time.perf_counter(), threading.Event()

    def beat():
        while not stop.wait(HEARTBEAT_S):
            spent[-1] = round(time.perf_counter() - start, 2)
            results.save()

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield spent
    finally:
        stop.set()
        thread.join()
        spent[-1] = round(time.perf_counter() - start, 2)
        results.save()


def _safe(spec: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(spec).name)


def _csv(models: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["model", "proxy", "table_s", "family", "plans", "spearman", "kendall"])
    for spec, entry in models.items():
        for name, record in entry["proxies"].items():
            for family, corr in record["families"].items():
                writer.writerow([spec, name, record["table_s"], family, corr["plans"],
                                 corr["spearman"], corr["kendall"]])
    return buffer.getvalue()


def _figure(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(exist_ok=True)
    models = data["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, (spec, entry) in zip(axes[0], models.items()):
        proxies = list(entry["proxies"])
        families = [*data["protocol"]["families"], "all"]
        width = 0.8 / max(1, len(proxies))
        for j, name in enumerate(proxies):
            record = entry["proxies"][name]
            values = [record["families"][f]["spearman"] for f in families]
            ax.bar([i + j * width for i in range(len(families))],
                   [np.nan if v is None else v for v in values], width=width,
                   label=f"{name} ({record['table_s']:.0f} s)")
        ax.set_xticks([i + width * (len(proxies) - 1) / 2 for i in range(len(families))],
                      families)
        ax.set_ylim(-1, 1)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_ylabel("Spearman: proxy against measured KL")
        ax.set_title(Path(spec).name, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)
