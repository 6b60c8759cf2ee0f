"""``search``: three levels, from a cheap estimate to a real measurement.

0. Sensitivity table (cached in ``out_dir``): predicted loss increase and bytes per layer ×
   option (sensitivity/).
1. Proxy level: the exact knapsack optimum under the budget (and latency limit), the optimum
   without 2-bit options (second-order proxies underrate 2-bit damage), the best fitting
   uniform plans (RTN and GPTQ at the largest size that fits), and the proxy's Pareto front
   over byte capacities (exact solves).
2. Optuna level (``trials`` > 0, search/optuna_level.py): a multi-objective study that
   reweights the proxy where it is not trusted, seeded with level 1's front, each trial's plan
   measured at low fidelity (KL on ``fast_windows`` held-out windows); persistent, resumable.
3. Measured level (``eval_top`` > 0, search/tune_level.py): the best ``eval_top`` plans of
   level 2 and level 1's candidates, evaluated on ``eval_windows`` held-out windows as Ray Tune
   trials with ASHA; the chosen plan is the lowest KL among those evaluated in full. With
   ``eval_top`` = 0 the candidates are measured in process instead.

Held-out windows come from the end of the *calibration* text, never the evaluation text. With a
device profile the budget is also capped by the memory the device lets a model use, layers
count the bytes the device's engine holds for them (hardware/memory.py), and
``max_latency_s`` (per decoded token) is a second knapsack row on the predicted decode time
(hardware/latency.py); what no layer choice changes (head, KV cache, per-block work) is taken
off the limit first.

``run_search`` runs the stages in order; their pieces live beside it: candidates.py (level 1's
plans), optuna_level.py (level 2), level3.py and tune_level.py (level 3), recover_stage.py
(``--recover kd``), rounding_stage.py (``--rounding signround``), records.py (the plan and
front written at the end). Each stage runs under ``times.stage`` (stage_times.py), which keeps
its time however it ends, so a search resumed over several attempts reports what it cost.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..accounting import Footprint, model_footprint
from ..data import calibration_data
from ..errors import AutocompressError
from ..hardware.llamacpp_speed import LlamaCppSpeed
from ..hardware.memory import held_layer_bytes
from ..hardware.profile import DeviceProfile
from .. import faults
from ..io_utils import atomic_write_text
from ..compress.apply import hessian_layers, needs_calibration, uses_calibration
from ..compress.stats_store import StatsStore, stats_key
from ..compress.recover import KDSettings
from ..compress.weights import GPTQSettings
from ..model import LayerInfo, LoadedModel
from ..peak_memory import peak_rss_bytes, return_freed_memory
from ..plan import LayerConfig, Plan
from ..sensitivity.build import build_table, make_proxy
from ..sensitivity.table import SensitivityTable
from ..units import format_size
from .exact import InfeasibleBudget
from .stage_times import StageTimes
from .measure import PlanMeter
from .optuna_level import Level2, Level2Settings
from .problem import Problem
from .speed import DeviceDecode, LlamaCppDecode
from .space import SearchSpace
from .candidates import Candidate, level1_candidates
from .level3 import measure_with_tune
from .records import plan_of, write_front
from .recover_stage import recover_chosen
from .rounding_stage import round_chosen


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
    speed_profile: LlamaCppSpeed | None = None  # predicts decode instead of the device profile
    max_latency_s: float | None = None  # per decoded token, batch 1, at ``context``
    # how candidates are calibrated where it decides the result (level 3, or the in-process
    # check) and how apply will build the plan: recorded in the plan's provenance
    mode: str = "sequential"
    gptq: GPTQSettings = field(default_factory=GPTQSettings)
    trials: int = 0  # level 2 (Optuna) trials; 0 skips the level
    eval_top: int = 0  # level 3 (Ray Tune) candidates from level 2; 0: measure in process
    fast_windows: int = 2  # level 2's held-out windows per trial
    eval_windows: int = 8  # level 3's held-out windows per candidate
    sampler: str = "tpe"
    storage: str | None = None
    seed: int = 0
    resume: bool = False
    num_cpus: int | None = None
    address: str | None = None
    level2_workers: int = 0  # Ray workers measuring level 2's trials (0: in this process)
    level2_batch: int | None = None  # trials asked at once (default: the workers, at least 1)
    recover: KDSettings | None = None  # the chosen plan recovered by distillation (kd)
    rounding: str | None = None  # the chosen plan's RTN/GPTQ layers given learned rounding

    def effective_budget(self) -> int:
        """The byte budget after the device's usable memory caps it."""
        limits = [b for b in (self.budget, self.device and self.device.memory.usable_bytes) if b]
        if not limits:
            raise AutocompressError("give --budget, or --device to use the memory it allows")
        return min(limits)


    @property
    def final_windows(self) -> int:
        """Held-out windows the chosen plan is measured on (level 3, or the in-process check)."""
        return self.eval_windows if self.eval_top else self.n_holdout

    @property
    def holdout_windows(self) -> int:
        """Held-out windows taken from the end of the calibration text: level 2's are the first
        ``fast_windows`` of them, the final measurement's the first ``final_windows``."""
        return max(self.final_windows, self.fast_windows if self.trials else 0)


@dataclass
class SearchResult:
    plan: Plan
    chosen: Candidate
    candidates: list[Candidate]
    table: SensitivityTable
    timings: dict[str, float] = field(default_factory=dict)
    front: list[Candidate] = field(default_factory=list)  # level 1's proxy Pareto front
    trials: list = field(default_factory=list)  # level 2's complete Optuna trials
    memory: dict = field(default_factory=dict)  # peak resident bytes (peak_memory.py)
    # level 2 on Ray workers: each worker's readiness, time measuring and plans
    level2_workers: list = field(default_factory=list)


@dataclass
class _Setup:
    """What every level of one search reads: the model, space and settings, the budget and
    what it leaves the searched layers, how a plan's bytes and speed are counted."""

    loaded: LoadedModel
    space: SearchSpace
    settings: SearchSettings
    out: Path | None
    budget: int
    capacity: int  # bytes the searched layers may use
    tables: dict[str, LayerConfig]  # the space's fixed formats (the embedding), in every plan
    footprint_of: Callable[[dict[str, LayerConfig]], Footprint]
    bytes_of: Callable[[LayerInfo, LayerConfig], int]
    speed: DeviceDecode | LlamaCppDecode | None
    full: set[str]  # layers whose options may need the full E[x xᵀ]


def run_search(loaded: LoadedModel, space: SearchSpace, settings: SearchSettings,
               out_dir: str | Path | None = None, progress: bool = True,
               log=print) -> SearchResult:
    setup = _prepare(loaded, space, settings, Path(out_dir) if out_dir else None, log)
    out = setup.out
    times = StageTimes(out, settings.resume, log)

    # -- level 0: the sensitivity table --------------------------------------------------------
    with times.stage("sensitivity_s"):
        calib = calibration_data(loaded.tokenizer, settings.calib_text, settings.n_calib,
                                 settings.holdout_windows, settings.window_len)
        # calibration statistics on disk, taken once (by the table where it needs them) and
        # read by every plan the levels build
        stats = StatsStore(out / "statistics" if out else None, loaded.layers,
                           stats_key(loaded, calib.digest), setup.full,
                           loaded.placement.device) \
            if uses_calibration(c for layer in loaded.layers for c in space.for_layer(layer)) \
            else None
        # the proxy is not kept past the table: a Fisher proxy holds one float32 per weight
        # (5 GB on a 1.5B model) that the measured levels' model copies need more
        table = build_table(loaded, space, make_proxy(settings.proxy), calib.calib,
                            calib.digest,
                            cache=out / "sensitivity.cache.json" if out else None,
                            progress=progress, log=log, stats_store=stats)
        if out:
            table.save(out / "sensitivity.json")
        return_freed_memory()  # the proxy's diagonal and the statistics are gone

    # -- level 1: exact proxy optima -----------------------------------------------------------
    with times.stage("level1_s"):
        problem = _problem(setup, table)
        candidates = level1_candidates(problem, space, setup.footprint_of)
        front = [Candidate(f"proxy front {fraction:.0%} of capacity", problem.configs(choice),
                           setup.footprint_of(problem.configs(choice)),
                           problem.predicted(choice))
                 for fraction, choice in problem.front()]

    # -- level 2: Optuna, each trial measured at low fidelity ----------------------------------
    study_trials: list = []
    worker_use: list[dict] = []
    if settings.trials:
        with times.stage("level2_s"):
            study_trials, worker_use = _level2(setup, problem, table, calib, stats, candidates,
                                               front, progress, log)
            return_freed_memory()  # statistics and memo: level 3 starts beside this
    if setup.speed is not None:
        for cand in candidates + front:
            cand.decode = setup.speed.estimate(cand.configs)

    # -- level 3: measured for real, each candidate built as apply will build it -----------------
    with times.stage("level3_s" if settings.eval_top else "measure_s"):
        final_meter = PlanMeter(loaded, calib.holdout[:settings.final_windows], calib.calib,
                                progress=False, mode=settings.mode, gptq=settings.gptq,
                                fixed=setup.tables, hessian_layers=setup.full, stats=stats)
        worker_peak = None
        if settings.eval_top:
            worker_peak = measure_with_tune(loaded, candidates, final_meter, calib, settings,
                                             out, log, progress)
            complete = [c for c in candidates if not c.measured["stopped_early"]]
        else:
            for cand in candidates:
                cand.measured = final_meter.measure(cand.configs)
                faults.point("final_measure")
            complete = candidates
    timings = times.totals()
    chosen = min(complete, key=lambda c: c.measured["kl"])

    plan = plan_of(setup, chosen, candidates, calib, timings)
    if settings.rounding is not None:
        with times.stage("rounding_s"):
            plan = round_chosen(loaded, plan, calib.holdout[:settings.final_windows],
                                settings.rounding, progress, log)
        plan.figures["timings_s"] = timings = times.totals()
    if settings.recover is not None:
        with times.stage("recover_s"):
            plan = recover_chosen(loaded, plan, calib.holdout[:settings.final_windows],
                                  settings.recover, out, progress, log)
        plan.figures["timings_s"] = timings = times.totals()
    memory = {"peak_rss_bytes": peak_rss_bytes(), "worker_peak_rss_bytes": worker_peak}
    if out:
        plan.save(out / "plan.json")
        atomic_write_text(out / "search.json",
                          json.dumps({"candidates": [c.summary() for c in candidates],
                                      "proxy_front": [c.summary() for c in front],
                                      "trials": len(study_trials),
                                      "chosen": chosen.label, "timings_s": timings,
                                      "level2_workers": worker_use, "memory": memory},
                                     indent=2))
        write_front(out, candidates, front, study_trials, chosen, loaded, settings)
    return SearchResult(plan=plan, chosen=chosen, candidates=candidates, table=table,
                        timings=timings, front=front, trials=study_trials, memory=memory,
                        level2_workers=worker_use)


def _prepare(loaded: LoadedModel, space: SearchSpace, settings: SearchSettings,
             out: Path | None, log) -> _Setup:
    """The budget (capped by the device), what it leaves the searched layers once the fixed
    bytes are taken off, and how plans are counted; the inputs checked before any work."""
    device = settings.device
    budget = settings.effective_budget()
    if device is not None and settings.budget and budget < settings.budget:
        log(f"the budget is capped at {format_size(budget)}: what {device.name} lets a model use "
            f"({device.memory.usable_fraction:.0%} of {format_size(device.memory.capacity)})")
    if settings.eval_top and out is None:
        raise AutocompressError("the measured level (eval_top > 0) needs an output directory")
    runtime_bytes = device.memory.runtime_overhead if device else 0

    def bytes_of(layer, cfg: LayerConfig) -> int:
        """A layer's bytes as the device's engine holds them (the plan's without a device)."""
        return held_layer_bytes(layer.out_features, layer.in_features, cfg, device)

    tables = space.table_configs(loaded)  # the embedding's fixed format, in every plan

    def footprint_of(configs: dict[str, LayerConfig]) -> Footprint:
        plain = model_footprint(loaded, {**configs, **tables}, settings.context, settings.batch,
                                runtime_bytes)
        if device is None:
            return plain
        return dataclasses.replace(plain, layer_weights=sum(
            bytes_of(layer, configs[layer.name]) for layer in loaded.layers))

    # Bytes outside the searched layers are fixed: the layers get what the budget leaves.
    smallest = {layer.name: min(space.for_layer(layer), key=lambda c: bytes_of(layer, c))
                for layer in loaded.layers}
    fixed = footprint_of(smallest)
    capacity = budget - (fixed.total - fixed.layer_weights)
    if capacity < fixed.layer_weights:
        raise InfeasibleBudget(budget, fixed.total, what="plan footprint",
                               detail=_footprint_parts(fixed, tables),
                               fix=_infeasible_fix(tables))
    speed = (LlamaCppDecode(loaded, settings.speed_profile, tables, settings.context)
             if settings.speed_profile else
             DeviceDecode(loaded, device, settings.context) if device else None)
    if settings.calib_text is None and needs_calibration(
            cfg for layer in loaded.layers for cfg in space.for_layer(layer)):
        log("note: GPTQ/Wanda options calibrate on the embedded pydoc corpus; prose close to "
            "your use gives better plans: pass --calib-text FILE")
    return _Setup(loaded, space, settings, out, budget, capacity, tables, footprint_of, bytes_of,
                  speed, hessian_layers(loaded.layers, space.for_layer))


def _problem(setup: _Setup, table: SensitivityTable) -> Problem:
    """Level 1's knapsack: the table's options per decision group, the capacity, the latency
    row where the search has a limit, bytes as the device holds them."""
    settings, speed = setup.settings, setup.speed
    groups = setup.space.decision_groups(setup.loaded.layers)
    limits = () if speed is None or settings.max_latency_s is None else \
        (speed.limit(table, groups, settings.max_latency_s),)
    width = max(len(options) for options in table.options)
    held = None if settings.device is None else np.array(
        [[setup.bytes_of(layer, cfg) for cfg in options] + [0] * (width - len(options))
         for layer, options in zip(setup.loaded.layers, table.options)], dtype=np.int64)
    return Problem(table, groups, setup.capacity, limits, size=held)


def _level2(setup: _Setup, problem: Problem, table: SensitivityTable, calib, stats,
            candidates: list[Candidate], front: list[Candidate], progress: bool, log
            ) -> tuple[list, list[dict]]:
    """The Optuna study, its trials measured at low fidelity: in this process or on Ray
    workers (``level2_workers``), every plan calibrated in parallel (statistics and the memo
    shared by all trials). Adds its best plans to ``candidates`` and every trial's KL to the
    candidates it measured; returns the complete trials and the workers' timelines."""
    loaded, settings, speed = setup.loaded, setup.settings, setup.speed
    start_wall = time.time()
    fast = calib.holdout[:settings.fast_windows]
    if settings.level2_workers:  # side by side on Ray workers, each with its own meter
        from .meter_pool import MeterPool

        if stats is not None:  # complete before the workers start: they read it
            stats.fill(loaded.model, calib.calib, progress=progress)
        meter = MeterPool(loaded.spec or loaded.source, fast, calib.calib, settings.gptq,
                          setup.tables, setup.full, workers=settings.level2_workers,
                          num_cpus=settings.num_cpus, address=settings.address,
                          placement=loaded.placement.worker_spec(),
                          stats_dir=None if stats is None or setup.out is None
                          else str(stats.directory.resolve()))
        measure_many = meter.measure_many
    else:
        meter = PlanMeter(loaded, fast, calib.calib, progress=False, gptq=settings.gptq,
                          fixed=setup.tables, hessian_layers=setup.full, stats=stats)
        measure_many = lambda plans: [meter.measure(c)["kl"] for c in plans]  # noqa: E731
    level2 = Level2(
        problem, Level2Settings(n_trials=settings.trials, sampler=settings.sampler,
                                seed=settings.seed, storage=settings.storage,
                                batch=settings.level2_batch or max(1, settings.level2_workers)),
        measure=lambda configs: measure_many([configs])[0], measure_many=measure_many,
        describe=lambda configs: (setup.footprint_of(configs).total,
                                  speed.estimate(configs).seconds_per_token if speed else None),
        budget=setup.budget, max_latency_s=settings.max_latency_s,
        with_latency=speed is not None, out_dir=setup.out, resume=settings.resume, log=log,
        progress=progress,
        identity={"budget": setup.budget, "space": setup.space.name, "proxy": settings.proxy,
                  "device": settings.device.name if settings.device else None,
                  **({"speed": speed.name} if isinstance(speed, LlamaCppDecode) else {}),
                  "max_latency_s": settings.max_latency_s,
                  "fast_windows": settings.fast_windows, "table": table.digest(),
                  "mode": settings.mode, "gptq": dataclasses.asdict(settings.gptq)})
    worker_use: list[dict] = []
    try:
        trials = level2.run()
        if settings.level2_workers:
            from .meter_pool import summarize_timelines

            worker_use = summarize_timelines(meter.timings(), start_wall)
    finally:
        if settings.level2_workers:
            meter.close()
    known = {c.signature: c for c in candidates}
    for rank, (signature, choice, kl) in enumerate(level2.best(settings.eval_top or 3)):
        if signature in known:
            continue
        configs = problem.configs(choice)
        candidates.append(Candidate(f"optuna #{rank + 1}", configs, setup.footprint_of(configs),
                                    problem.predicted(choice), source="optuna"))
    by_signature = {t.user_attrs["signature"]: t.user_attrs["kl_fast"] for t in trials}
    for cand in candidates + front:
        cand.kl_fast = by_signature.get(cand.signature, cand.kl_fast)
    return trials, worker_use


def _footprint_parts(footprint: Footprint, tables: dict[str, LayerConfig]) -> str:
    """What the smallest plan's bytes are made of, for the one-line refusal."""
    stored = ", ".join(f"{name} {cfg.short()}" for name, cfg in tables.items())
    parts = [f"block linears {format_size(footprint.layer_weights)}",
             f"embedding, head and norms {format_size(footprint.other_weights)}"
             + (f" ({stored}, fixed by the space)" if stored else "")]
    if footprint.kv_cache:
        parts.append(f"KV cache {format_size(footprint.kv_cache)}")
    runtime = footprint.workspace + footprint.runtime_overhead
    if runtime:
        parts.append(f"workspace and runtime {format_size(runtime)}")
    return ", ".join(parts)


def _infeasible_fix(tables: dict[str, LayerConfig]) -> str:
    if not tables:
        return ""
    return ("raise the budget, allow fewer bits in the search space, or give its `tables:` a "
            "smaller type (e.g. model.embed_tokens: {gguf: q4_k})")
