"""``search``: proxy table -> exact knapsack optimum -> measured check against uniform plans.

1. Sensitivity table (cached in ``out_dir``): predicted loss increase and bytes per layer × option.
2. Exact proxy optimum under the byte budget (``exact.solve_mckp``), plus the optimum without
   2-bit options: second-order proxies underrate 2-bit damage, which is far from additive.
3. Every candidate and the best uniform plan that fits are applied and measured (KL to the
   uncompressed model, and perplexity) on held-out windows from the *calibration* text
   (search/measure.py; GPTQ/Wanda statistics from one pass of the uncompressed model); the
   lowest KL wins. So the search never returns a plan that measures worse than the best
   fitting uniform plan, and says which one won.

With a device profile (``settings.device``) the budget is also capped by the memory the device
lets a model use, the runtime's own bytes count in the footprint, and ``max_latency_s`` (per
decoded token, from --latency or --min-tps) becomes a second knapsack constraint on the
predicted decode time of the layers (hardware/latency.py); the rest of a token's time (head, KV
cache, per-block work) does not depend on the plan and is taken off the limit first.
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
from ..errors import AutocompressError
from ..hardware.architecture import Architecture
from ..hardware.latency import DecodeEstimate, LatencyModel
from ..hardware.profile import DeviceProfile
from ..units import format_size
from .exact import InfeasibleBudget, Limit, solve_mckp
from .measure import PlanMeter
from .space import SearchSpace


@dataclass
class SearchSettings:
    budget: int | None  # bytes, whole inference footprint (None: what the device allows)
    context: int = 2048
    batch: int = 1
    n_calib: int = 8  # windows for the proxy
    n_holdout: int = 4  # windows for the measured check
    window_len: int = 512
    calib_text: str | None = None
    proxy: str = "fisher"
    device: DeviceProfile | None = None
    max_latency_s: float | None = None  # per decoded token, batch 1, at ``context``

    def effective_budget(self) -> int:
        """The byte budget after the device's usable memory caps it."""
        limits = [b for b in (self.budget, self.device and self.device.memory.usable_bytes) if b]
        if not limits:
            raise AutocompressError("give --budget, or --device to use the memory it allows")
        return min(limits)


@dataclass
class Candidate:
    label: str
    configs: dict[str, LayerConfig]
    footprint: Footprint
    predicted: float | None  # summed proxy cost (nats), None for plans not from the table
    measured: dict | None = None  # holdout kl / ppl
    decode: DecodeEstimate | None = None  # predicted on the device, when one is given

    def summary(self) -> dict:
        return {"label": self.label, "total_bytes": self.footprint.total,
                "weight_bytes": self.footprint.weights, "predicted": self.predicted,
                "measured": self.measured,
                "decode": None if self.decode is None else self.decode.as_dict()}


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
    device = settings.device
    budget = settings.effective_budget()
    if device is not None and settings.budget and budget < settings.budget:
        log(f"the budget is capped at {format_size(budget)}: what {device.name} lets a model use "
            f"({device.memory.usable_fraction:.0%} of {format_size(device.memory.capacity)})")
    runtime_bytes = device.memory.runtime_overhead if device else 0

    def footprint_of(configs: dict[str, LayerConfig]) -> Footprint:
        return model_footprint(loaded, configs, settings.context, settings.batch, runtime_bytes)

    # Bytes outside the searched layers are fixed: the layers get what the budget leaves.
    smallest = {layer.name: min(space.for_layer(layer),
                                key=lambda c: layer_bytes(layer.out_features, layer.in_features, c))
                for layer in loaded.layers}
    fixed = footprint_of(smallest)
    capacity = budget - (fixed.total - fixed.layer_weights)
    if capacity < fixed.layer_weights:
        raise InfeasibleBudget(budget, fixed.total, what="plan footprint")
    speed = _DecodeSpeed(loaded, device, settings) if device else None

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
    limits = () if speed is None or settings.max_latency_s is None else \
        (speed.limit(table, groups, settings.max_latency_s),)
    candidates = _candidates(table, space, groups, capacity, footprint_of, limits)
    if speed is not None:
        for cand in candidates:
            cand.decode = speed.estimate(cand.configs)
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
        "budget_bytes": budget,
        "device": device.name if device else None,
        "max_latency_s": settings.max_latency_s,
        "decode": None if chosen.decode is None else chosen.decode.as_dict(),
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


class _DecodeSpeed:
    """Predicted decode time of plans on the device (batch 1, at the search's context)."""

    def __init__(self, loaded: LoadedModel, device: DeviceProfile, settings: SearchSettings):
        self.model = LatencyModel(device)
        self.arch = Architecture.from_loaded(loaded)
        self.device = device
        self.context = settings.context
        self.shapes = [layer.shape for layer in loaded.layers]

    def estimate(self, configs: dict[str, LayerConfig]) -> DecodeEstimate:
        return self.model.decode(self.arch, [configs[layer.name] for layer in self.arch.layers],
                                 self.context)

    def limit(self, table: SensitivityTable, groups: list[list[int]], max_latency_s: float
              ) -> Limit:
        """Per decision group and option, predicted microseconds; the limit is what the
        per-token budget leaves after the plan-independent part."""
        width = max(len(opts) for opts in table.options)
        usage = np.zeros((len(table.layers), width))
        for row, (shape, opts) in enumerate(zip(self.shapes, table.options)):
            for col, cfg in enumerate(opts):
                usage[row, col] = self.model.layer_seconds(*shape, cfg)[0] * 1e6
        grouped = np.stack([usage[g].sum(axis=0) for g in groups])
        fixed = self.model.fixed_decode_seconds(self.arch, self.context)
        name, target = self.device.name, 1.0 / max_latency_s

        def describe(least_us: float) -> str:
            best = 1.0 / (fixed + least_us * 1e-6)
            return (f"no plan in the search space reaches {target:.1f} tokens/s "
                    f"({max_latency_s * 1e3:.1f} ms/token) on {name}: the fastest predicts "
                    f"{best:.1f} tokens/s at context {self.context}; relax --min-tps/--latency "
                    "or allow fewer bits in the search space")
        return Limit(grouped, (max_latency_s - fixed) * 1e6, describe)


def _candidates(table: SensitivityTable, space: SearchSpace, groups: list[list[int]],
                capacity: int, footprint_of, limits: tuple[Limit, ...] = ()) -> list[Candidate]:
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
        choice = _expand(solve_mckp(cost, size, capacity, allowed=allowed, limits=limits),
                         groups, n_layers)
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

    uniform = _best_uniform(table, space, capacity, groups, limits)
    if uniform is not None:
        cfg, choice = uniform
        add(f"uniform {cfg.short()}", table.configs(choice), table.predicted(choice)[0])
    return list(found.values())


def _best_uniform(table: SensitivityTable, space: SearchSpace, capacity: int,
                  groups: list[list[int]], limits: tuple[Limit, ...] = ()
                  ) -> tuple[LayerConfig, list[int]] | None:
    """The largest uniform option that fits (pinned layers keep their pin) and meets the
    limits: more bytes, more fidelity. None if none does."""
    best = None
    for cfg in space.uniform_configs():
        choice = [opts.index(cfg) if cfg in opts else 0 for opts in table.options]
        size = table.predicted(choice)[1]
        per_group = [choice[g[0]] for g in groups]
        within = all(sum(limit.usage[i, o] for i, o in enumerate(per_group)) <= limit.maximum
                     for limit in limits)
        if size <= capacity and within and (best is None or size > best[2]):
            best = (cfg, choice, size)
    return None if best is None else best[:2]


def _most_common(configs: dict[str, LayerConfig]) -> LayerConfig:
    counts: dict[LayerConfig, int] = {}
    for cfg in configs.values():
        counts[cfg] = counts.get(cfg, 0) + 1
    return max(counts, key=counts.get)
