"""``search``: proxy table -> exact knapsack optimum -> measured check against uniform plans.

1. Sensitivity table (cached in ``out_dir``): predicted loss increase and bytes per layer × option.
2. Exact proxy optimum under the byte budget (``exact.solve_mckp``), plus the optimum without
   2-bit options: second-order proxies underrate 2-bit damage, which is far from additive.
3. Every candidate and the best uniform plan that fits are applied and measured (KL to the
   uncompressed model, and perplexity) on held-out windows from the *calibration* text
   (search/measure.py; GPTQ/Wanda statistics from one pass of the uncompressed model); the
   lowest KL wins. So the search never returns a plan that measures worse than the best
   fitting uniform plan, and says which one won.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..accounting import Footprint, layer_bytes, model_footprint
from ..data import calibration_data
from ..io_utils import atomic_write_text
from ..model import LoadedModel
from ..plan import LayerConfig, Plan, compact_overrides
from ..sensitivity.build import build_table, make_proxy
from ..sensitivity.table import SensitivityTable
from .exact import InfeasibleBudget, solve_mckp
from .measure import PlanMeter
from .space import SearchSpace


@dataclass
class SearchSettings:
    budget: int  # bytes, whole inference footprint
    context: int = 2048
    batch: int = 1
    n_calib: int = 8  # windows for the proxy
    n_holdout: int = 4  # windows for the measured check
    window_len: int = 512
    calib_text: str | None = None
    proxy: str = "fisher"


@dataclass
class Candidate:
    label: str
    configs: dict[str, LayerConfig]
    footprint: Footprint
    predicted: float | None  # summed proxy cost (nats), None for plans not from the table
    measured: dict | None = None  # holdout kl / ppl

    def summary(self) -> dict:
        return {"label": self.label, "total_bytes": self.footprint.total,
                "weight_bytes": self.footprint.weights, "predicted": self.predicted,
                "measured": self.measured}


@dataclass
class SearchResult:
    plan: Plan
    chosen: Candidate
    candidates: list[Candidate]
    table: SensitivityTable
    timings: dict[str, float] = field(default_factory=dict)


def run_search(loaded: LoadedModel, space: SearchSpace, settings: SearchSettings,
               out_dir: str | Path | None = None, progress: bool = True,
               log=print) -> SearchResult:
    timings: dict[str, float] = {}

    def footprint_of(configs: dict[str, LayerConfig]) -> Footprint:
        return model_footprint(loaded, configs, settings.context, settings.batch)

    # Bytes outside the searched layers are fixed: the layers get what the budget leaves.
    smallest = {layer.name: min(space.for_layer(layer),
                                key=lambda c: layer_bytes(layer.out_features, layer.in_features, c))
                for layer in loaded.layers}
    fixed = footprint_of(smallest)
    capacity = settings.budget - (fixed.total - fixed.layer_weights)
    if capacity < fixed.layer_weights:
        raise InfeasibleBudget(settings.budget, fixed.total, what="plan footprint")

    t0 = time.perf_counter()
    calib = calibration_data(loaded.tokenizer, settings.calib_text, settings.n_calib,
                             settings.n_holdout, settings.window_len)
    proxy = make_proxy(settings.proxy)
    cache = Path(out_dir) / "sensitivity.cache.json" if out_dir else None
    table = build_table(loaded, space, proxy, calib.calib, calib.digest, cache=cache,
                        progress=progress, log=log)
    if out_dir:
        table.save(Path(out_dir) / "sensitivity.json")
    timings["sensitivity_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    groups = space.decision_groups(loaded.layers)
    candidates = _candidates(table, space, groups, capacity, footprint_of)
    timings["solve_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    meter = PlanMeter(loaded, calib.holdout, calib.calib, progress=progress)
    for cand in candidates:
        cand.measured = meter.measure(cand.configs, desc=f"check {cand.label}")
    timings["measure_s"] = time.perf_counter() - t0
    chosen = min(candidates, key=lambda c: c.measured["kl"])

    default = _most_common(chosen.configs)
    plan = Plan(model=loaded.identity, default=default,
                overrides=compact_overrides(chosen.configs, default))
    plan.figures = {
        "chosen": chosen.label,
        "budget_bytes": settings.budget,
        "context": settings.context,
        "batch": settings.batch,
        "footprint": chosen.footprint.as_dict(),
        "predicted_loss_increase": chosen.predicted,
        "holdout": {"source": calib.source, "windows": settings.n_holdout,
                    "window_len": settings.window_len},
        "candidates": [c.summary() for c in candidates],
        "timings_s": timings,
    }
    if out_dir:
        plan.save(Path(out_dir) / "plan.json")
        atomic_write_text(Path(out_dir) / "search.json",
                          json.dumps({"candidates": [c.summary() for c in candidates],
                                      "chosen": chosen.label, "timings_s": timings}, indent=2))
    return SearchResult(plan=plan, chosen=chosen, candidates=candidates, table=table,
                        timings=timings)


def _grouped(table: SensitivityTable, groups: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Cost and bytes per decision group: tied layers share one option index, so their rows
    add up (their option lists are equal by construction of the space)."""
    cost, size = table.cost_matrix(), table.bytes_matrix()
    return (np.stack([cost[g].sum(axis=0) for g in groups]),
            np.stack([size[g].sum(axis=0) for g in groups]))


def _expand(choice: list[int], groups: list[list[int]], n_layers: int) -> list[int]:
    per_layer = [0] * n_layers
    for group, option in zip(groups, choice):
        for index in group:
            per_layer[index] = option
    return per_layer


def _candidates(table: SensitivityTable, space: SearchSpace, groups: list[list[int]],
                capacity: int, footprint_of) -> list[Candidate]:
    cost, size = _grouped(table, groups)
    n_layers = len(table.layers)
    found: dict[tuple, Candidate] = {}

    def add(label: str, configs: dict[str, LayerConfig], predicted: float | None) -> None:
        signature = tuple(configs[n] for n in table.layers)
        if signature in found:  # same plan reached twice: measure once, keep both names
            found[signature].label += f" = {label}"
            return
        found[signature] = Candidate(label, configs, footprint_of(configs), predicted)

    def add_solution(label: str, allowed: np.ndarray | None = None) -> None:
        choice = _expand(solve_mckp(cost, size, capacity, allowed=allowed), groups, n_layers)
        add(label, table.configs(choice), table.predicted(choice)[0])

    add_solution("proxy optimum")
    bits = np.array([[table.options[g[0]][o].bits if o < len(table.options[g[0]]) else 99
                      for o in range(cost.shape[1])] for g in groups])
    no_two_bit = bits > 2
    if (~no_two_bit).any() and no_two_bit.any(axis=1).all():
        try:
            add_solution("proxy optimum, no 2-bit", allowed=no_two_bit)
        except InfeasibleBudget:
            pass

    uniform = _best_uniform(table, space, capacity)
    if uniform is not None:
        cfg, choice = uniform
        add(f"uniform {cfg.short()}", table.configs(choice), table.predicted(choice)[0])
    return list(found.values())


def _best_uniform(table: SensitivityTable, space: SearchSpace, capacity: int
                  ) -> tuple[LayerConfig, list[int]] | None:
    """The largest uniform option that fits (pinned layers keep their pin): more bytes, more
    fidelity. None if none fits."""
    best = None
    for cfg in space.uniform_configs():
        choice = [opts.index(cfg) if cfg in opts else 0 for opts in table.options]
        size = table.predicted(choice)[1]
        if size <= capacity and (best is None or size > best[2]):
            best = (cfg, choice, size)
    return None if best is None else best[:2]


def _most_common(configs: dict[str, LayerConfig]) -> LayerConfig:
    counts: dict[LayerConfig, int] = {}
    for cfg in configs.values():
        counts[cfg] = counts.get(cfg, 0) + 1
    return max(counts, key=counts.get)
