"""Level 2: Optuna explores where the additive proxy is not trusted.

A trial does not pick 100+ per-layer options at random (no sampler learns that from a few
dozen trials). It picks a handful of *corrections* to the proxy, the places DESIGN.md's
experiments found it wrong: how much to distrust 2-bit and 3-bit options, unstructured and 2:4
sparsity, low rank, coarse groups, attention layers against MLP layers, and the first and last
blocks; plus the share of the byte capacity to use (for the memory axis of the front). The
exact solver turns the reweighted table into the best plan under the budget and latency
limits, and the plan is measured for real at low fidelity (KL to the uncompressed model on a
few held-out windows). Objectives: measured KL, total bytes and, on a device, predicted
seconds per token; the limits are also recorded with ``trial.set_constraint``.

The proxy's own optima (its Pareto front over capacities, every weight 1) come first, so the
study starts from level 1 and the sampler learns from there. A study lives in a storage
(default: a journal file in the output directory), so a killed search resumes: trials that
were running are marked failed and run again, and the study continues until it holds
``n_trials`` complete trials. A resumed study asks what the uninterrupted one would have asked
(module notes at ``Level2._ask``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import optuna
from optuna.trial import TrialState

from .. import faults
from ..errors import AutocompressError
from ..model import BLOCK_INDEX
from ..gguf_types import GGUF_TYPES
from ..plan import LayerConfig
from .problem import Problem

STUDY_NAME = "autocompress"
WEIGHT_RANGE = (1 / 3, 3.0)  # corrections, not a new proxy: within 3x either way
SAMPLERS = ("tpe", "nsga2", "gp", "random")


def _kind(problem: Problem, group: list[int]) -> str:
    return problem.table.layers[group[0]].rsplit(".", 1)[-1]


def _bits_class(c: LayerConfig) -> int:
    """2 or 3 for the options the 2-/3-bit knobs correct: native bits, or a GGUF type's bits
    per weight (q2_k 2.6, q3_k 3.4; their fallbacks on short rows are not known here)."""
    if c.is_gguf:
        return int(GGUF_TYPES[c.gguf].bits_per_weight)
    return c.bits


# knob name -> does it apply to (option, kinds of the group, block of the group, number of blocks)
KNOBS: dict[str, Callable[[LayerConfig, str, int | None, int], bool]] = {
    "w_2bit": lambda c, k, b, n: _bits_class(c) == 2,
    "w_3bit": lambda c, k, b, n: _bits_class(c) == 3,
    "w_sparse": lambda c, k, b, n: c.sparsity > 0 and c.pattern == "unstructured",
    "w_2to4": lambda c, k, b, n: c.pattern == "2:4",
    "w_lowrank": lambda c, k, b, n: c.is_low_rank,
    "w_coarse": lambda c, k, b, n: c.bits < 16 and c.group_size in (128, -1),
    "w_gptq": lambda c, k, b, n: c.method == "gptq",
    "w_attention": lambda c, k, b, n: k in ("q_proj", "k_proj", "v_proj", "o_proj"),
    "w_edge_blocks": lambda c, k, b, n: b is not None and (b < max(1, n // 8)
                                                           or b >= n - max(1, n // 8)),
}


def _block_of(name: str) -> int | None:
    match = BLOCK_INDEX.search(name)
    return int(match.group(1)) if match else None


class Reweighting:
    """Per (decision group, option): which knobs multiply its proxy cost."""

    def __init__(self, problem: Problem):
        blocks = [_block_of(problem.table.layers[g[0]]) for g in problem.groups]
        n_blocks = max((b for b in blocks if b is not None), default=-1) + 1
        self.masks = {}
        for knob, applies in KNOBS.items():
            mask = np.zeros(problem.cost.shape, dtype=bool)
            for gi, (group, row) in enumerate(zip(problem.groups, problem.options)):
                kind = _kind(problem, group)
                for oi, cfg in enumerate(row):
                    mask[gi, oi] = cfg is not None and applies(cfg, kind, blocks[gi], n_blocks)
            if mask.any():  # knobs that touch nothing in this space are not searched
                self.masks[knob] = mask

    def cost(self, problem: Problem, weights: dict[str, float]) -> np.ndarray:
        factor = np.ones(problem.cost.shape)
        for knob, mask in self.masks.items():
            factor = np.where(mask, factor * weights.get(knob, 1.0), factor)
        return problem.cost * factor


@dataclass
class Level2Settings:
    n_trials: int = 40
    sampler: str = "tpe"
    seed: int = 0
    storage: str | None = None  # URL, journal file path, or None for <out>/study.journal
    capacity_span: float = 0.1  # trials may use down to (1 - span) of the byte capacity: the
    # front's memory axis, kept narrow so that most trials work at the budget itself
    front_points: int = 4
    batch: int = 1  # trials asked before any is told: measured side by side (meter_pool.py)


def open_storage(storage: str | None, out_dir: Path | None):
    """An Optuna storage: an RDB URL (sqlite:///..., postgresql://...), a journal file path, or
    by default a journal file in the output directory (viewable with optuna-dashboard)."""
    if storage and "://" in storage:
        return storage
    path = Path(storage) if storage else (Path(out_dir) / "study.journal" if out_dir else None)
    if path is None:
        return None  # in memory: no --out, nothing to resume
    path.parent.mkdir(parents=True, exist_ok=True)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


def check_storage(storage: str | None, out_dir: str | Path | None) -> None:
    """Open the storage once before any work, so that a bad URL or an unwritable journal is
    one line at the start, not a traceback after the sensitivity table."""
    if storage is None:
        return  # the default journal in --out, whose directory the output policy checked
    if "://" not in storage:
        parent = Path(storage).parent
        if Path(storage).is_dir() or not parent.is_dir():
            raise AutocompressError(f"--storage {storage!r}: give a journal file in an existing "
                                    "directory, or an RDB URL such as sqlite:///study.db")
    try:
        optuna.study.get_all_study_names(open_storage(storage, out_dir))
    except Exception as exc:  # SQLAlchemy, journal and driver errors all say something useful
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AutocompressError(f"--storage {storage!r} cannot be opened ({first}); give a "
                                "journal file or an RDB URL such as sqlite:///study.db") from None


def make_sampler(name: str, seed: int):
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=8)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=16)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise AutocompressError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}")


def plan_signature(configs: dict[str, LayerConfig]) -> str:
    text = json.dumps({n: c.to_dict() for n, c in sorted(configs.items())}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Level2:
    """``measure(configs) -> kl`` is the low-fidelity measurement; ``describe(configs) ->
    (total bytes, seconds per token or None)`` the hardware figures of a plan;
    ``measure_many(list of configs) -> kls``, where given, measures a batch side by side."""

    def __init__(self, problem: Problem, settings: Level2Settings, measure, describe,
                 budget: int, max_latency_s: float | None, with_latency: bool,
                 out_dir: Path | None = None, resume: bool = False, log=print,
                 progress: bool = True, identity: dict | None = None, measure_many=None):
        self.problem, self.settings = problem, settings
        self.measure, self.describe = measure, describe
        self.measure_many = measure_many or (lambda plans: [measure(c) for c in plans])
        self.budget, self.max_latency_s = budget, max_latency_s
        self.reweighting = Reweighting(problem)
        self.log, self.progress = log, progress
        self.with_latency = with_latency
        directions = ["minimize", "minimize"] + (["minimize"] if self.with_latency else [])
        storage = open_storage(settings.storage, out_dir)
        exists = False
        if storage is not None:
            exists = STUDY_NAME in optuna.study.get_all_study_names(storage)
        if exists and not resume:
            raise AutocompressError(
                f"a study already exists in {settings.storage or Path(out_dir) / 'study.journal'}; "
                "add --resume to continue it, or use another --out")
        # failures are said by this module in one line; Optuna's own warnings carry tracebacks
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        self.study = optuna.create_study(
            study_name=STUDY_NAME, storage=storage, directions=directions,
            sampler=make_sampler(settings.sampler, settings.seed), load_if_exists=True)
        # what the study searches: a study resumed with another budget, space or device would
        # mix trials of two problems
        identity = {"capacity": int(problem.capacity), "layers": len(problem.table.layers),
                    "options": len(problem.options[0]), **(identity or {})}
        if settings.batch > 1:  # batches ask other trials (studies before batches had none)
            identity["batch"] = settings.batch
        identity["trials"] = "by position"  # studies before positions resumed out of order
        stored = self.study.user_attrs.get("identity") if exists else None
        if stored is not None:
            if stored != json.loads(json.dumps(identity)):
                changed = sorted(k for k in set(stored) | set(identity)
                                 if stored.get(k) != identity.get(k))
                raise AutocompressError(
                    f"the study in this output directory was for other settings "
                    f"({', '.join(changed)} differ); use another --out")
        else:  # a new study, or one killed before it recorded what it searches
            self.study.set_user_attr("identity", identity)
        self.lo = max(problem.min_bytes / problem.capacity, 1.0 - settings.capacity_span)
        self._cache: dict[str, float] = {}
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            self._cache[trial.user_attrs["signature"]] = trial.user_attrs["kl_fast"]
        if exists:
            self._requeue_interrupted()

    # -- the sequence of trials ----------------------------------------------------------------
    def _seed_params(self) -> list[dict[str, float]]:
        """The first trials: level 1's proxy front, all weights 1, then the two corrections
        measurements most often call for: the optimum without 2-bit (second-order proxies
        underrate its damage) and the optimum trusting GPTQ 3x more (a diagonal proxy scores
        GPTQ's ΔW elementwise and overrates its damage: SmolLM2's Fisher table costs GPTQ 1.5x
        RTN at equal bits where the measured KL is 0.45x)."""
        ones = {knob: 1.0 for knob in self.reweighting.masks}
        seeds = [{"capacity": 1.0, **ones}]
        for fraction in np.linspace(1.0, self.lo, self.settings.front_points)[1:]:
            seeds.append({"capacity": float(fraction), **ones})
        if "w_2bit" in ones:
            seeds.append({"capacity": 1.0, **ones, "w_2bit": WEIGHT_RANGE[1]})
        if "w_gptq" in ones:
            seeds.append({"capacity": 1.0, **ones, "w_gptq": WEIGHT_RANGE[0]})
        return seeds

    def _knobs(self) -> set[str]:
        return {*self.reweighting.masks, "capacity"}

    def _attrs_at(self, position: int, batch_end: int) -> dict:
        """``batch_end``: the position after the last of the trial's batch (a batch cut by a
        kill is finished as it was begun: its later trials' history is the one before it)."""
        attrs: dict = {"position": position, "batch_end": batch_end}
        if position < len(self._seed_params()):
            attrs.update(seed="proxy front", seed_index=position)
        return attrs

    def _next_position(self) -> int:
        return 1 + max((t.user_attrs.get("position", -1)
                        for t in self.study.get_trials(deepcopy=False)), default=-1)

    def _ask(self, position: int, batch_end: int, enqueue: bool = True) -> optuna.Trial:
        """The trial at ``position``, its place in an uninterrupted run (the seeds first).
        Optuna's samplers read the history in trial-number order (TPE's mixture, its weights
        and its tie-breaks all depend on it), so a resumed study must give every trial a
        number in the order of its position, as the uninterrupted one does: a trial is
        enqueued just before it is asked (never the seeds all at once, where a seed run again
        came after the others), and its sampler is made afresh, seeded by the seed and the
        position (Optuna's samplers keep only their RNG outside the storage). ``enqueue``
        False: the trial is the copy of an interrupted one, already enqueued."""
        if enqueue:
            seeds = self._seed_params()
            params = seeds[position] if position < len(seeds) else {}
            self.study.enqueue_trial(params, user_attrs=self._attrs_at(position, batch_end))
        self.study.sampler = make_sampler(self.settings.sampler,
                                          self.settings.seed * 100_003 + position)
        return self.study.ask()

    def _requeue_interrupted(self) -> None:
        """Trials a killed or interrupted process left RUNNING (or enqueued and not yet
        asked): failed, and enqueued again, one copy per position, in the order of their
        positions. A copy keeps the parameters if all were suggested (the sampler asked them
        from the history an uninterrupted run had); otherwise it is sampled again at its
        position, whose history is the same (no trial of a batch is told before all of it is
        proposed). Kill-safe: the copy is enqueued before the originals are failed, a copy
        left from a killed resume is itself taken as interrupted, and ``requeued_from`` names
        each failed trial once."""
        for _ in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            self.study.ask()  # enqueued, never asked: asked now, to be failed with the rest
        trials = self.study.get_trials(deepcopy=False)
        claimed = {n for t in trials for n in t.user_attrs.get("requeued_from", [])}
        groups: dict[int, list] = {}
        for trial in trials:
            if trial.state != TrialState.RUNNING:
                continue
            if "position" not in trial.user_attrs:  # not asked by this module: not re-run
                self.study.tell(trial.number, state=TrialState.FAIL)
                continue
            groups.setdefault(trial.user_attrs["position"], []).append(trial)
        for position in sorted(groups):
            group = groups[position]
            params = next((dict(t.params) for t in reversed(group)
                           if set(t.params) == self._knobs()), None)
            if params is None and position < len(self._seed_params()):
                params = self._seed_params()[position]
            attrs = {**self._attrs_at(position, group[-1].user_attrs["batch_end"]),
                     "requeued_from": [t.number for t in group if t.number not in claimed]}
            self.study.enqueue_trial(params or {}, user_attrs=attrs)
            for trial in group:
                self.study.tell(trial.number, state=TrialState.FAIL)
                self.log(f"trial {trial.number} was interrupted: run again")

    # -- trials --------------------------------------------------------------------------------
    def propose(self, trial: optuna.Trial) -> tuple[dict[str, LayerConfig], list[int]]:
        """The trial's corrections and capacity, solved into a plan."""
        weights = {knob: trial.suggest_float(knob, *WEIGHT_RANGE, log=True)
                   for knob in self.reweighting.masks}
        fraction = trial.suggest_float("capacity", self.lo, 1.0)
        cost = self.reweighting.cost(self.problem, weights)
        choice = self.problem.solve(cost, capacity=int(fraction * self.problem.capacity))
        return self.problem.configs(choice), choice

    def record(self, trial: optuna.Trial, configs: dict[str, LayerConfig], choice: list[int],
               kl: float) -> list[float]:
        """The trial's attributes and objective values, for a plan measured at ``kl``."""
        total, seconds = self.describe(configs)
        trial.set_user_attr("signature", plan_signature(configs))
        trial.set_user_attr("choice", [int(c) for c in choice])
        trial.set_user_attr("kl_fast", kl)
        trial.set_user_attr("predicted", self.problem.predicted(choice))
        trial.set_user_attr("total_bytes", int(total))
        trial.set_constraint("memory", float(total - self.budget))
        if self.max_latency_s is not None:
            trial.set_constraint("latency", float(seconds - self.max_latency_s))
        values = [kl, float(total)]
        if self.with_latency:
            trial.set_user_attr("seconds_per_token", seconds)
            values.append(float(seconds))
        return values

    def _measure_new(self, plans: list[dict[str, LayerConfig]]) -> None:
        """Measure the plans not measured before (the same plan reached twice: once)."""
        new: dict[str, dict[str, LayerConfig]] = {}
        for configs in plans:
            signature = plan_signature(configs)
            if signature not in self._cache:
                new.setdefault(signature, configs)
        for signature, kl in zip(new, self.measure_many(list(new.values()))):
            self._cache[signature] = kl

    def _batch(self, copies: list[int], new: list[int], batch_end: int) -> None:
        """The copies of interrupted trials (enqueued again, at positions ``copies``) and new
        trials at positions ``new`` asked, their plans measured together, then the tells in
        order. An interrupt leaves the batch RUNNING in the storage, as a kill does; --resume
        runs it again."""
        asked = []
        for position in copies + new:
            trial = self._ask(position, batch_end, enqueue=position not in copies)
            try:
                asked.append((trial, *self.propose(trial)))
            except AutocompressError as exc:
                self.study.tell(trial, state=TrialState.FAIL)
                self.log(f"level 2: trial {trial.number} failed: {exc}")
        try:
            self._measure_new([configs for _, configs, _ in asked])
        except AutocompressError as exc:
            for trial, _, _ in asked:
                self.study.tell(trial, state=TrialState.FAIL)
            self.log(f"level 2: trials {', '.join(str(t.number) for t, _, _ in asked)} "
                     f"failed: {exc}")
            return
        faults.point("level2_trial")  # measured, not yet recorded
        for trial, configs, choice in asked:
            values = self.record(trial, configs, choice, self._cache[plan_signature(configs)])
            self.study.tell(trial, values)

    def complete_trials(self) -> list:
        return self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))

    def run(self) -> list:
        from tqdm import tqdm

        target = self.settings.n_trials
        done = len(self.complete_trials())
        if done:
            self.log(f"level 2: {done} of {target} trials already complete")
        with tqdm(total=target, initial=min(done, target), desc="level 2 (optuna)",
                  disable=not self.progress, leave=False) as bar:
            attempts = 0
            while done < target:
                waiting = self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
                start = self._next_position()
                if waiting:  # the interrupted trials first, in the batch they were in
                    end = max(t.user_attrs["batch_end"] for t in waiting)
                    self._batch([t.user_attrs["position"] for t in waiting],
                                list(range(start, end)), end)
                else:
                    end = start + min(self.settings.batch, target - done)
                    self._batch([], list(range(start, end)), end)
                attempts += 1
                now = len(self.complete_trials())
                bar.update(now - done)
                done = now
                if attempts > 3 * target:
                    raise AutocompressError("level 2: most trials fail; see the study storage")
        return self.complete_trials()

    def best(self, k: int) -> list[tuple[str, list[int], float]]:
        """Up to ``k`` distinct feasible plans with the lowest measured KL: (signature, choice,
        KL)."""
        seen, out = set(), []
        for trial in sorted(self.complete_trials(), key=lambda t: t.values[0]):
            if any(v > 0 for v in trial.constraints.values()):
                continue
            signature = trial.user_attrs["signature"]
            if signature in seen:
                continue
            seen.add(signature)
            out.append((signature, trial.user_attrs["choice"], trial.values[0]))
            if len(out) == k:
                break
        return out
