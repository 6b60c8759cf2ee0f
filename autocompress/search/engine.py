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
from ..hardware.latency import DecodeEstimate
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
from ..residency import release_module
from ..plan import LayerConfig, Plan, compact_overrides
from ..provenance import Provenance
from ..sensitivity.build import build_table, make_proxy
from ..sensitivity.table import SensitivityTable
from ..units import format_size
from .exact import InfeasibleBudget, InfeasibleLimit
from .holdout import holdout_record
from .stage_times import StageTimes
from .measure import PlanMeter
from .optuna_level import Level2, Level2Settings, plan_signature
from .problem import Problem
from .speed import DeviceDecode, LlamaCppDecode
from .space import SearchSpace
from .recover_stage import recover_chosen
from .tune_level import Level3Settings, run_level3, write_candidate, write_job


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
class Candidate:
    label: str
    configs: dict[str, LayerConfig]
    footprint: Footprint
    predicted: float | None  # summed proxy cost (nats), None for plans not from the table
    measured: dict | None = None  # held-out kl / ppl (level 3, or the in-process check)
    decode: DecodeEstimate | None = None  # predicted on the device, when one is given
    source: str = "proxy"  # proxy | uniform | optuna
    kl_fast: float | None = None  # level 2's low-fidelity KL

    def summary(self) -> dict:
        return {"label": self.label, "source": self.source, "total_bytes": self.footprint.total,
                "weight_bytes": self.footprint.weights, "predicted": self.predicted,
                "kl_fast": self.kl_fast, "measured": self.measured,
                "decode": None if self.decode is None else self.decode.as_dict()}

    @property
    def signature(self) -> str:
        return plan_signature(self.configs)


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
    t0 = time.perf_counter()
    calib = calibration_data(loaded.tokenizer, settings.calib_text, settings.n_calib,
                             settings.holdout_windows, settings.window_len)
    # calibration statistics on disk, taken once (by the table where it needs them) and read
    # by every plan the levels build
    stats = StatsStore(out / "statistics" if out else None, loaded.layers,
                       stats_key(loaded, calib.digest), setup.full, loaded.placement.device) \
        if uses_calibration(c for layer in loaded.layers for c in space.for_layer(layer)) else None
    # the proxy is not kept past the table: a Fisher proxy holds one float32 per weight (5 GB
    # on a 1.5B model) that the measured levels' model copies need more
    table = build_table(loaded, space, make_proxy(settings.proxy), calib.calib, calib.digest,
                        cache=out / "sensitivity.cache.json" if out else None,
                        progress=progress, log=log, stats_store=stats)
    if out:
        table.save(out / "sensitivity.json")
    return_freed_memory()  # the proxy's diagonal and the statistics are gone
    times.record("sensitivity_s", time.perf_counter() - t0)

    # -- level 1: exact proxy optima -----------------------------------------------------------
    t0 = time.perf_counter()
    problem = _problem(setup, table)
    candidates = _candidates(problem, space, setup.footprint_of)
    front = [Candidate(f"proxy front {fraction:.0%} of capacity", problem.configs(choice),
                       setup.footprint_of(problem.configs(choice)), problem.predicted(choice))
             for fraction, choice in problem.front()]
    times.record("level1_s", time.perf_counter() - t0)

    # -- level 2: Optuna, each trial measured at low fidelity ----------------------------------
    study_trials: list = []
    worker_use: list[dict] = []
    if settings.trials:
        t0 = time.perf_counter()
        study_trials, worker_use = _level2(setup, problem, table, calib, stats, candidates,
                                           front, progress, log)
        return_freed_memory()  # statistics and memo: level 3 starts beside this
        times.record("level2_s", time.perf_counter() - t0)
    if setup.speed is not None:
        for cand in candidates + front:
            cand.decode = setup.speed.estimate(cand.configs)

    # -- level 3: measured for real, each candidate built as apply will build it -----------------
    t0 = time.perf_counter()
    final_meter = PlanMeter(loaded, calib.holdout[:settings.final_windows], calib.calib,
                            progress=False, mode=settings.mode, gptq=settings.gptq,
                            fixed=setup.tables, hessian_layers=setup.full, stats=stats)
    worker_peak = None
    if settings.eval_top:
        worker_peak = _measure_with_tune(loaded, candidates, final_meter, calib, settings, out,
                                         log, progress)
        complete = [c for c in candidates if not c.measured["stopped_early"]]
    else:
        for cand in candidates:
            cand.measured = final_meter.measure(cand.configs)
            faults.point("final_measure")
        complete = candidates
    times.record("level3_s" if settings.eval_top else "measure_s", time.perf_counter() - t0)
    timings = times.totals()
    chosen = min(complete, key=lambda c: c.measured["kl"])

    plan = _plan_of(setup, chosen, candidates, calib, timings)
    if settings.recover is not None:
        t0 = time.perf_counter()
        plan = recover_chosen(loaded, plan, calib.holdout[:settings.final_windows],
                              settings.recover, out, progress, log)
        times.record("recover_s", time.perf_counter() - t0)
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
        _write_front(out, candidates, front, study_trials, chosen, loaded, settings)
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


def _plan_of(setup: _Setup, chosen: Candidate, candidates: list[Candidate], calib,
             timings: dict[str, float]) -> Plan:
    """The chosen candidate as a plan: its formats, how its weights are made (provenance:
    what apply and eval reproduce) and the figures the search measured for it."""
    loaded, settings = setup.loaded, setup.settings
    default = _most_common(chosen.configs)
    calib_text = str(Path(settings.calib_text).resolve()) if settings.calib_text else None
    provenance = Provenance(calib_text=calib_text, calib_windows=settings.n_calib,
                            window_len=settings.window_len, calib_digest=calib.digest,
                            mode=settings.mode, gptq_damp=settings.gptq.damp,
                            gptq_act_order=settings.gptq.act_order,
                            gptq_block_size=settings.gptq.block_size,
                            compute_dtype=loaded.placement.dtype_name, made_by="search")
    overrides = {**compact_overrides(chosen.configs, default),
                 **compact_overrides(setup.tables, LayerConfig())}
    plan = Plan(model=loaded.identity, default=default, overrides=overrides,
                provenance=provenance)
    plan.figures = {
        "chosen": chosen.label,
        "budget_bytes": setup.budget,
        "device": settings.device.name if settings.device else None,
        "max_latency_s": settings.max_latency_s,
        "decode": None if chosen.decode is None else chosen.decode.as_dict(),
        "context": settings.context,
        "batch": settings.batch,
        "footprint": chosen.footprint.as_dict(),
        "predicted_loss_increase": chosen.predicted,
        "holdout": holdout_record(calib_text, calib.source, settings.holdout_windows,
                                  calib.holdout[:settings.final_windows], chosen.measured),
        "candidates": [c.summary() for c in candidates],
        "timings_s": timings,
    }
    return plan


def _measure_with_tune(loaded, candidates, meter, calib, settings, out, log, progress
                       ) -> int | None:
    """Level 3: write the job (windows, reference, calibration windows, each candidate's plan)
    and run Ray Tune, whose workers build and measure the candidates as ``meter`` would;
    returns the largest peak resident memory of the workers."""
    from ..compress.apply import uses_calibration
    from ..evaluate import ReferenceCache

    job = out / "level3"
    windows = calib.holdout[:settings.eval_windows]
    calibrated = any(uses_calibration({**c.configs, **meter.fixed}.values()) for c in candidates)
    reference = ReferenceCache(loaded.model, windows).fill()
    # the driver computes nothing more while the workers build: its weights leave memory
    # (pages of the model's file, read in again if needed) and so do freed heap pages
    release_module(loaded.model)
    return_freed_memory()
    write_job(job, loaded.spec or loaded.source, windows, reference,
              threads=settings.num_cpus or 2, calib=calib.calib if calibrated else None,
              mode=meter.mode, gptq=meter.gptq, placement=loaded.placement.worker_spec())
    names = {}
    for cand in candidates:
        names[cand.signature] = cand
        write_candidate(job, cand.signature, {**cand.configs, **meter.fixed})
    results = run_level3(job, list(names), Level3Settings(
        windows=settings.eval_windows, num_cpus=settings.num_cpus, address=settings.address),
        tokens_per_window=settings.window_len - 1, resume=settings.resume, log=log,
        progress=progress)
    worker_peaks = [results[name].pop("peak_rss_bytes", None) for name in names]
    for name, cand in names.items():
        cand.measured = results[name]
    return max((p for p in worker_peaks if p), default=None)


def _write_front(out, candidates, front, trials, chosen, loaded, settings) -> None:
    from .pareto import write_pareto

    def record(c: Candidate, source: str | None = None) -> dict:
        m = c.measured or {}
        return {"label": c.label, "source": source or c.source,
                "total_bytes": c.footprint.total, "predicted": c.predicted,
                "kl_fast": c.kl_fast, "kl": m.get("kl"), "ppl": m.get("ppl"),
                "tokens_per_s": c.decode.tokens_per_s if c.decode else None,
                "chosen": c is chosen}

    records = [record(c) for c in candidates] + [record(c, "proxy") for c in front]
    listed = {c.signature for c in candidates}
    for t in trials:  # every other level-2 plan, at its low-fidelity KL
        if t.user_attrs["signature"] in listed:
            continue
        listed.add(t.user_attrs["signature"])
        seconds = t.user_attrs.get("seconds_per_token")
        records.append({"label": f"trial {t.number}", "source": "optuna",
                        "total_bytes": t.user_attrs["total_bytes"],
                        "predicted": t.user_attrs["predicted"], "kl_fast": t.user_attrs["kl_fast"],
                        "kl": None, "ppl": None,
                        "tokens_per_s": 1 / seconds if seconds else None, "chosen": False})
    where = f" on {settings.device.name}" if settings.device else ""
    write_pareto(out, records, title=f"{loaded.name}{where}: quality against memory")


def _candidates(problem: Problem, space: SearchSpace, footprint_of) -> list[Candidate]:
    """Level 1: the proxy optimum, the optimum without 2-bit options, the largest uniform
    plans that fit."""
    found: dict[tuple, Candidate] = {}

    def add(label: str, choice: list[int], source: str = "proxy") -> None:
        configs = problem.configs(choice)
        signature = tuple(configs[n] for n in problem.table.layers)
        if signature in found:  # same plan reached twice: measure once, keep both names
            found[signature].label += f" = {label}"
            return
        found[signature] = Candidate(label, configs, footprint_of(configs),
                                     problem.predicted(choice), source=source)

    add("proxy optimum", problem.solve())
    no_two_bit = problem.option_mask(lambda cfg: cfg.bits > 2)
    if (problem.allowed & ~no_two_bit).any() and (problem.allowed & no_two_bit).any(axis=1).all():
        try:
            add("proxy optimum, no 2-bit", problem.solve(allowed=no_two_bit))
        except (InfeasibleBudget, InfeasibleLimit):  # nothing without 2-bit fits the limits
            pass
    for cfg, choice in _largest_uniform(problem, space):
        add(f"uniform {cfg.short()}", choice, source="uniform")
    return list(found.values())


def _largest_uniform(problem: Problem, space: SearchSpace) -> list[tuple[LayerConfig, list[int]]]:
    """The largest uniform options that fit (pinned layers keep their pin) and meet the limits
    (more bytes, more fidelity): every one of that size, since options of equal bytes differ
    in method (RTN or GPTQ) and the proxy is least trusted in telling them apart."""
    fitting = []
    rows = np.arange(len(problem.groups))
    for cfg in space.uniform_configs():
        choice = [row.index(cfg) if cfg in row else 0 for row in problem.options]
        size = problem.layer_bytes(choice)
        within = all(limit.usage[rows, choice].sum() <= limit.maximum for limit in problem.limits)
        if size <= problem.capacity and within:
            fitting.append((size, cfg, choice))
    largest = max((size for size, _, _ in fitting), default=None)
    return [(cfg, choice) for size, cfg, choice in fitting if size == largest]


def _most_common(configs: dict[str, LayerConfig]) -> LayerConfig:
    counts: dict[LayerConfig, int] = {}
    for cfg in configs.values():
        counts[cfg] = counts.get(cfg, 0) + 1
    return max(counts, key=counts.get)


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
