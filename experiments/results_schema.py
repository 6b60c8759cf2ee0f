"""Schema of experiments/results/*.json, the files the benchmarks write (common.ResultFile) and
experiments/readme_tables.py renders into the README.

Every file has one shape: ``{"protocol": {...}, "entries": {KEY: {...}, ...}}``. Per file, the
models below declare the protocol keys and entry fields the renderer reads, with their types;
fields a file may lack (written by an older version of a benchmark) are optional, and the
renderer says so rather than printing a made-up value. The models ignore every other field, and
the renderer reads the validated models only, so it cannot read a field that is not declared
here.

    validate(path) -> Results     # or raises ResultsError with one line: file, field, problem
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, RootModel, ValidationError, model_validator


class ResultsError(ValueError):
    """A results file the renderer cannot use; the message is one line naming file and field."""


class _Model(BaseModel):
    # strict: no "12" for 12 (an int is still accepted as a float); frozen: rendering only reads
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class _Document(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    protocol: dict[str, Any]
    entries: dict[str, Any]


# ---------------------------------------------------------------- baselines.json


class BaselinesProtocol(_Model):
    model: str
    eval: str
    calibration: str
    formats: str
    machine: str


class Baseline(_Model):
    """One uniform plan (every entry but search@rtn3; other sections read ppl and compress_s)."""
    ppl: float
    bits_per_weight: float
    layer_weight_bytes: int
    total_bytes: int
    compress_s: float
    eval_s: float


class Measured(_Model):
    kl: float
    ppl: float
    tokens: int
    windows: int | None = None  # written by newer versions of the search's measure step


class Candidate(_Model):
    label: str
    total_bytes: int
    predicted: float | None
    measured: Measured


class SearchBaseline(Baseline):
    """search@rtn3: the plan `search` chose at the bytes of uniform RTN 3-bit."""
    chosen: str
    search_s: float
    candidates: list[Candidate]
    timings_s: dict[str, float]  # whatever the engine wrote: solve_s (old), level1_s, ...


# ---------------------------------------------------------------- gptq_study_<bits>bit.json


class GptqStudyProtocol(_Model):
    model: str
    eval: str
    format: str
    machine: str


class GptqSettings(_Model):
    damp: float
    act_order: bool


class GptqVariant(_Model):
    ppl: float
    mode: str
    calib_windows: int
    calib_text: str
    gptq: GptqSettings
    compress_s: float


# ---------------------------------------------------------------- quality.json


class QualityProtocol(_Model):
    model: str
    eval: str
    format: str
    calibration: str
    recovery: str
    machine: str


class Recovered(_Model):
    steps: int
    best_step: int
    kl_before: float
    kl_after: float
    lr: float | None = None  # the rate trained at (after any back-off)
    lr_abandoned: list[float] = []  # rates backed off from (rows before it was kept: not said)


class SignRoundRecord(_Model):
    steps: int
    lr: float
    eval_every: int
    seed: int


class QualityRow(_Model):
    ppl: float
    config: dict[str, Any]
    build_s: float
    kd: Recovered | None = None
    signround: SignRoundRecord | None = None  # the learned-rounding rows' fixed settings


class Uncompressed(_Model):
    ppl: float


# ---------------------------------------------------------------- kernels[_threads<n>].json


class KernelsProtocol(_Model):
    model: str
    threads: int
    tokens: int
    prompt: str
    machine: str


class Bandwidth(_Model):
    copy_gb_s: float


class Decode(_Model):
    """A decode configuration (every entry but bandwidth and kernels)."""
    tokens_per_s: float
    bytes_per_token: int
    layer_bytes_resident: int
    layer_bytes_plan: int
    layer_bytes_predicted: int | None = None
    resident_over_plan: float | None = None  # packed plans only (not fp32/bf16)
    share_of_copy_bandwidth: float | None = None
    ort_threads: int | None = None
    kernels: dict[str, int]
    load_average_1min: float


# ---------------------------------------------------------------- proxy_fidelity.json


class ProxyFidelityProtocol(_Model):
    model: str
    space: str
    plans: str
    proxy_calibration: str
    measured: str
    machine: str


class RandomPlan(_Model):
    kl: float
    bits_per_weight: float


class RandomPlans(RootModel[dict[str, RandomPlan]]):
    model_config = ConfigDict(strict=True, frozen=True)


class ProxyScore(_Model):
    """One proxy (every entry but plans): a table of its own, or a calibrated one."""
    spearman: float
    kendall: float
    table_build_s: float | None = None
    folds: int | None = None
    families: list[str] | None = None
    coefficients_all_plans: list[float] | None = None

    @model_validator(mode="after")
    def _build_or_folds(self) -> ProxyScore:
        if self.table_build_s is None and self.folds is None:
            raise ValueError("needs table_build_s (a proxy's own table) or folds (a calibrated "
                             "one)")
        if (self.families is None) != (self.coefficients_all_plans is None) or (
                self.families is not None and
                len(self.families) != len(self.coefficients_all_plans)):
            raise ValueError("families and coefficients_all_plans go together, one per family")
        return self


# ---------------------------------------------------------------- joint_vs_bits_<proxy>.json


class JointVsBitsProtocol(_Model):
    model: str
    search: str
    eval: str
    machine: str


class JointVsBits(_Model):
    budget_bytes: int
    ppl: float
    chosen: str


# ---------------------------------------------------------------- latency_model.json


class LatencyProtocol(_Model):
    model: str
    decode: str
    prompt: str
    runtime: str
    machine: str


class Profile(_Model):
    seconds: float
    bandwidth_gbps: float
    block_us: float
    token_us: float


class CpuDecode(_Model):
    plan: str
    tokens: int
    kernels: dict[str, int]
    sources: dict[str, int]
    measured_s: float
    predicted_s: float
    error: float


class PublishedDecode(_Model):
    device: str
    model: str
    format: str
    engine: str
    published_tps: float
    predicted_tps: float
    error: float


# ---------------------------------------------------------------- search.json


class SearchProtocol(_Model):
    model: str
    search: str
    eval: str
    machine: str


class Recipe(_Model):
    label: str
    ppl: float


class Uniform(_Model):
    bits: int
    ppl: float


class DecodePrediction(_Model):
    tokens_per_s: float


class Reproduced(_Model):
    """`autocompress eval PLAN --holdout` against the KL the search reported for the plan."""
    reported_kl: float
    eval_kl: float
    windows: int
    relative_difference: float


class FinalStages(_Model):
    """What search --rounding / --recover did to the chosen plan (the plan's own records)."""
    rounding: dict[str, Any] | None = None
    recovery: dict[str, Any] | None = None  # the plan's record of a kept recovery
    # what the recovery stage tried, kept or not (figures["recovery"]; rows before it: None)
    recovery_tried: dict[str, Any] | None = None
    holdout: dict[str, Any]


class SearchRun(_Model):
    budget_bytes: int
    searched_ppl: float
    proxy_optimum_ppl: float
    chosen: str
    search_s: float
    timings_s: dict[str, float]
    recipe: Recipe | None = None
    uniform_rtn: Uniform | None = None
    uniform_gptq: Uniform | None = None
    uniform_gptq_act_order: Uniform | None = None  # built as the searched plan (its provenance)
    reproduced: Reproduced | None = None
    device: str | None = None
    min_tps: float | None = None
    decode: DecodePrediction | None = None
    stages: FinalStages | None = None

    @model_validator(mode="after")
    def _device_and_limit(self) -> SearchRun:
        if (self.device is None) != (self.min_tps is None):
            raise ValueError("device and min_tps go together")
        return self


# ---------------------------------------------------------------- table_fast_path.json


class TableFastPathProtocol(_Model):
    model: str
    space: str
    proxy: str
    machine: str


class FastPath(_Model):
    layers: int
    options_scored: int
    delta_path_s: float
    fast_path_s: float
    speedup: float
    max_relative_difference: float


# ---------------------------------------------------------------- peak_memory.json


class PeakMemoryProtocol(_Model):
    sampler: str
    machine: str


class PeakMemory(_Model):
    """One command's peak memory, its descendants (Ray workers) included."""
    command: str
    peak_pss_bytes: int
    peak_rss_sum_bytes: int
    largest_process_rss_bytes: int
    processes: int
    wall_s: float
    measured_at: str


# ---------------------------------------------------------------- dtype.json


class DtypeProtocol(_Model):
    model: str
    eval: str
    plans: str
    reference: str
    machine: str


class DtypeRun(_Model):
    """One plan evaluated with the model loaded and computed in ``dtype``."""
    dtype: str
    plan: str
    ppl: float
    kl: float
    tokens: int
    build_s: float
    eval_s: float
    tokens_per_s: float
    param_bytes: int
    measured_at: str


# ---------------------------------------------------------------- scale.json


class ScaleProtocol(_Model):
    search: str
    budget: str
    memory: str
    eval: str
    machine: str


class ScaleEval(_Model):
    ppl: float
    kl: float
    total_bytes: int


class ScaleRun(_Model):
    """One search (MODEL@BITS): its stages' wall time, its process tree's peak memory, the
    searched plan's test perplexity against the uniform plans at the same bytes."""
    model: str
    command: str
    params: int
    bf16_weight_bytes: int
    budget_bytes: int
    wall_s: float
    attempts: int = 1  # the search interrupted and resumed attempts - 1 times
    timings_s: dict[str, float]
    # a table taken from another entry's run (scale.py --table-from): its time measured there
    table_from: str | None = None
    table_from_sensitivity_s: float | None = None
    peak_pss_bytes: int
    sampler_cpu_s: float | None = None  # the memory sampler's own CPU time, all attempts
    chosen: str
    eval_windows: int
    searched: ScaleEval
    uniform_rtn: ScaleEval
    uniform_gptq: ScaleEval
    measured_at: str


# ---------------------------------------------------------------- paired_eval.json


class PairedEvalProtocol(_Model):
    eval: str
    comparison: str
    machine: str


class PairedPlan(_Model):
    plan: str
    ppl: float
    kl: float | None  # None: measured with --no-kl
    total_bytes: int
    wall_s: float


class PairedComparison(_Model):
    a: str
    b: str
    ppl_ratio: float  # ppl_a / ppl_b
    ppl_ratio_95: list[float]  # [low, high]
    p_value: float
    windows_better: int  # windows where a's loss is lower
    # the same for each window's mean KL to the uncompressed model (absent: --no-kl)
    kl_diff: float | None = None  # KL_a - KL_b, nats per token
    kl_diff_95: list[float] | None = None
    kl_p_value: float | None = None
    kl_windows_better: int | None = None


class PairedEval(_Model):
    """Plans of one model on the same test windows, the first against each other one
    (paired_eval.py)."""
    model: str
    windows: int
    eval_text: str
    plans: dict[str, PairedPlan]
    comparisons: list[PairedComparison]
    measured_at: str


# ---------------------------------------------------------------- seed_spread.json


class SeedSpreadProtocol(_Model):
    search: str
    budget: str
    eval: str
    machine: str


class SeedRun(_Model):
    """The scale benchmark's SmolLM2 search again with ``--seed N`` (seed_spread.py)."""
    seed: int
    ppl: float
    kl: float
    total_bytes: int
    chosen: str
    holdout_kl: float
    wall_s: float


# ---------------------------------------------------------------- projection_8b.json


class ProjectionProtocol(_Model):
    what: str
    method: str


class Projection(_Model):
    """An 8B search projected from a measured scale.json entry (project_8b.py): per stage
    [low, high] seconds."""
    source: str
    params_8b: int
    forward_ratio: float
    factorization_ratio: float
    measured_s: dict[str, float]
    cpu_s: dict[str, list[float]]
    one_gpu_s: dict[str, list[float]]
    eight_gpus_s: dict[str, list[float]]
    cpu_peak_bytes: int
    cpu_bf16_weights_x2_bytes: int
    gpu_memory_bytes: int
    gpu_weights_bytes: int
    cpu_rate_gflops: float
    gpu_speedup_forward: float
    gpu_speedup_table: float
    parallel_efficiency: float
    assumed: dict[str, Any]
    measured_at: str


# ---------------------------------------------------------------- level2_workers.json


class Level2WorkersProtocol(_Model):
    model: str
    search: str
    workers: str
    machine: str


class WorkerUse(_Model):
    """One worker's level 2: model loaded after ``ready_s``, ``measuring_s`` spent on
    ``plans`` plans (search.engine's summarize_timelines)."""
    ready_s: float
    measuring_s: float
    plans: int
    last_done_s: float


class Level2Ceiling(_Model):
    """What two processes gain over one on this machine (level2_workers.py --ceiling)."""
    forwards: int
    alone_s: float
    together_s: list[float]
    throughput_ratio: float
    measured_at: str


class Level2Workers(_Model):
    """One run of level 2 with ``workers`` Ray workers."""
    worker_use: list[WorkerUse] | None = None  # recorded from the dynamic dispatch on
    workers: int
    batch: int
    trials: int
    level2_s: float
    search_s: float
    signatures: list[str]
    kl_fast: list[float]
    same_trials_as_first: bool
    measured_at: str


# ---------------------------------------------------------------- gguf.json


class GgufProtocol(_Model):
    model: str
    eval: str
    engine: str
    kl_reference: str
    calibration: str
    machine: str


class GgufRecipe(_Model):
    """A llama.cpp recipe exported and run in llama.cpp (keys RECIPE or RECIPE imatrix)."""
    recipe: str
    imatrix: bool
    ppl: float
    kl: float
    file_bytes: int
    tensor_bytes: int
    types: dict[str, int]
    export_s: float
    eval_s: float
    decode_tps: float | None = None  # llama.cpp decode at batch 1 on this machine
    predicted_tps: float | None = None  # the llama.cpp speed profile's prediction
    speed_profile: str | None = None
    speed_protocol: str | None = None
    mixed_types: bool | None = None  # stores weights in a mixture no profile file had
    torch_ppl: float | None = None  # `autocompress eval` of the same plan, same windows
    torch_kl: float | None = None
    tensor_weights: int | None = None  # weights in the plan's entries (for bits per weight)


class GgufSearch(_Model):
    """`search --space gguf` at a recipe's bytes (keys search@RECIPE)."""
    recipe: str
    budget_bytes: int
    ppl: float
    kl: float
    file_bytes: int
    tensor_bytes: int
    types: dict[str, int]
    chosen: str
    search_s: float
    settings: str
    decode_tps: float | None = None
    predicted_tps: float | None = None
    speed_profile: str | None = None
    speed_protocol: str | None = None
    mixed_types: bool | None = None  # stores weights in a mixture no profile file had
    torch_ppl: float | None = None
    torch_kl: float | None = None
    tensor_weights: int | None = None


# ---------------------------------------------------------------- the files


Entry = Callable[[str], "type[BaseModel] | None"]


# ---------------------------------------------------------------- recovery.json


class RecoveryProtocol(_Model):
    model: str
    plan: str
    holdout: str
    eval: str
    recovery: str
    machine: str


class RecoveryBefore(_Model):
    holdout_kl: float
    test_ppl: float
    search_reported_kl: float


class RecoveryRecordRow(_Model):
    steps: int
    best_step: int
    lr: float  # the rate trained at
    lr_abandoned: list[float] = []  # rates backed off from (rows before back-off: none)
    lr_lowered_at: list[int] = []  # steps where a stall quartered the rate (rows before: none)
    train_windows: int
    val_windows: int
    kl_before: float
    kl_after: float


class RecoveryRow(_Model):
    holdout_kl_after: float
    holdout_kl_change: float
    test_ppl: float
    recover_s: float
    settings: dict[str, Any]
    kd: RecoveryRecordRow


@dataclass(frozen=True)
class FileSpec:
    """protocol: its model; entry(key): the model of that entry, None for entries no section
    reads; keys: a regex every entry key must match (the renderer parses keys); required: entry
    keys a section needs."""
    protocol: type[_Model]
    entry: Entry
    keys: str | None = None
    required: tuple[str, ...] = ()


def _by_key(models: dict[str, type[BaseModel] | None], default: type[BaseModel] | None) -> Entry:
    return lambda key: models.get(key, default)


def _by_prefix(models: dict[str, type[BaseModel]]) -> Entry:
    return lambda key: next((m for p, m in models.items() if key.startswith(p)), None)


# entry keys of search.json: [SPACE:]BITS[@DEVICE], e.g. "3", "bits:2.5", "4@jetson-orin-nano-8gb"
SEARCH_KEY = r"(?:(?P<space>[\w.-]+):)?(?P<bits>\d+(?:\.\d+)?)(?:@(?P<device>[\w.-]+))?"

_KERNELS = FileSpec(KernelsProtocol, _by_key({"bandwidth": Bandwidth, "kernels": None}, Decode))

SPECS: dict[str, FileSpec] = {
    "baselines.json": FileSpec(BaselinesProtocol,
                               _by_key({"search@rtn3": SearchBaseline}, Baseline),
                               required=("base",)),
    "gptq_study_*bit.json": FileSpec(GptqStudyProtocol, _by_key({}, GptqVariant)),
    "quality.json": FileSpec(QualityProtocol, _by_key({"uncompressed": Uncompressed},
                                                      QualityRow),
                             keys=r"uncompressed|\d+g\d+-[a-z+]+", required=("uncompressed",)),
    "kernels.json": _KERNELS,
    "kernels_threads*.json": _KERNELS,
    "proxy_fidelity.json": FileSpec(ProxyFidelityProtocol,
                                    _by_key({"plans": RandomPlans}, ProxyScore)),
    "joint_vs_bits_*.json": FileSpec(JointVsBitsProtocol, _by_key({}, JointVsBits),
                                     keys=r"[\w-]+@\d+(?:\.\d+)?"),
    "latency_model.json": FileSpec(LatencyProtocol,
                                   _by_prefix({"profile": Profile, "cpu:": CpuDecode,
                                               "published:": PublishedDecode})),
    "search.json": FileSpec(SearchProtocol, _by_key({}, SearchRun), keys=SEARCH_KEY),
    # the same benchmark before level 3 built candidates as apply does (parallel calibration)
    "search_v1.json": FileSpec(SearchProtocol, _by_key({}, SearchRun), keys=SEARCH_KEY),
    "gguf.json": FileSpec(GgufProtocol, lambda key: GgufSearch if key.startswith("search@")
                          else GgufRecipe, keys=r"(?:search@)?[A-Z0-9_]+(?: imatrix)?"),
    "gguf_*.json": FileSpec(GgufProtocol, lambda key: GgufSearch if key.startswith("search@")
                          else GgufRecipe, keys=r"(?:search@)?[A-Z0-9_]+(?: imatrix)?"),
    "peak_memory.json": FileSpec(PeakMemoryProtocol, _by_key({}, PeakMemory)),
    "level2_workers.json": FileSpec(Level2WorkersProtocol,
                                    _by_key({"ceiling": Level2Ceiling}, Level2Workers)),
    "scale.json": FileSpec(ScaleProtocol, _by_key({}, ScaleRun),
                           keys=r"[\w.-]+@\d+(/[\w.-]+)?"),  # MODEL@BITS[/TAG]
    "paired_eval.json": FileSpec(PairedEvalProtocol, _by_key({}, PairedEval),
                                 keys=r"[\w.-]+@\d+(/[\w.-]+)?"),  # a scale.json key
    "seed_spread.json": FileSpec(SeedSpreadProtocol, _by_key({}, SeedRun),
                                 keys=r"[\w.-]+@\d+/seed\d+"),
    "projection_8b.json": FileSpec(ProjectionProtocol, _by_key({}, Projection),
                                   keys=r"[\w.-]+ from [\w.-]+@\d+(/[\w.-]+)?"),
    "dtype.json": FileSpec(DtypeProtocol, _by_key({}, DtypeRun),
                           keys=r"(?:float32|bfloat16|float16)/[\w-]+"),
    "recovery.json": FileSpec(RecoveryProtocol, _by_key({"before": RecoveryBefore}, RecoveryRow),
                              keys=r"before|kd-(?:\d+w|defaults)[\w.-]*", required=("before",)),
    "recovery_*.json": FileSpec(RecoveryProtocol,
                                _by_key({"before": RecoveryBefore}, RecoveryRow),
                                keys=r"before|kd-(?:\d+w|defaults)[\w.-]*", required=("before",)),
    "table_fast_path.json": FileSpec(TableFastPathProtocol, _by_key({"fisher": FastPath}, None),
                                     required=("fisher",)),
}


# ---------------------------------------------------------------- studies/NAME/NAME.json
# A study writes its own shape (autocompress/studies/), not protocol + entries: each file is
# one model, validated whole (validate_study).


class LayerOption(_Model):
    bits: int
    group_size: int
    sym: bool
    method: str


class LayersProtocol(_Model):
    option: LayerOption
    measure_windows: int
    measure_every: int
    window_len: int
    depth_bins: int
    calib_text: str | None = None


class TableSource(_Model):
    proxy: str
    table: str | None = None


class KindShares(_Model):
    kind: dict[str, float] = {}


class LayersModel(_Model):
    name: str
    source: TableSource
    layers: dict[str, Any]
    measured: dict[str, Any]
    proxy_vs_measured: float | None
    profiles: dict[str, KindShares]


class Rhos(_Model):
    kind: float | None = None
    depth: float | None = None


class LayersStudy(_Model):
    protocol: LayersProtocol
    models: dict[str, LayersModel]
    correlations: dict[str, dict[str, Rhos]]


class FrontsProtocol(_Model):
    model: str
    proxy: str
    calib_windows: int
    window_len: int
    points: int
    measure: str
    speed: str
    context: int
    min_tps: dict[str, float] = {}  # studies run before speed limits existed have none


class FrontPoint(_Model):
    total_bytes: int
    kl: float
    tokens_per_s: float


class EqualMemoryPlan(_Model):
    formats: dict[str, Any]
    tokens_per_s: float | None = None


class EqualMemory(_Model):
    capacity_bytes: int | None = None
    devices: dict[str, EqualMemoryPlan] = {}
    layers_that_differ: list[str] = []


class FrontsStudy(_Model):
    protocol: FrontsProtocol
    devices: dict[str, list[FrontPoint]]
    equal_memory: EqualMemory

    @model_validator(mode="after")
    def _fronts_not_empty(self) -> "FrontsStudy":
        empty = [d for d, front in self.devices.items() if not front]
        if empty:
            raise ValueError(f"device {empty[0]} has no plans on its front")
        return self


class FamiliesProtocol(_Model):
    model: str
    budget: str
    context: int
    search: str
    proxy: str
    calib_windows: int
    measure: str


class FamilyCell(_Model):
    family: str
    bits: float
    feasible: bool
    budget_bytes: int
    kl: float | None = None
    ppl: float | None = None

    @model_validator(mode="after")
    def _measured_if_feasible(self) -> "FamilyCell":
        if self.feasible and (self.kl is None or self.ppl is None):
            raise ValueError("a feasible cell needs its kl and ppl")
        return self


class FamiliesStudy(_Model):
    protocol: FamiliesProtocol
    cells: dict[str, FamilyCell]


class ProxiesProtocol(_Model):
    families: list[str]
    plans_per_family: int
    calib_windows: int
    holdout_windows: int
    window_len: int
    measured: str
    cost: str
    calib_text: str | None = None


class Correlation(_Model):
    spearman: float | None
    kendall: float | None
    plans: int


class ProxyRecord(_Model):
    table_s: float  # all attempts together
    families: dict[str, Correlation]
    attempts_s: list[float] | None = None  # each attempt's seconds (absent: written before)


class ProxiesModel(_Model):
    plans: dict[str, Any]
    proxies: dict[str, ProxyRecord]
    building: dict[str, list[float]] | None = None  # tables begun, their attempts' seconds


class ProxiesStudy(_Model):
    protocol: ProxiesProtocol
    models: dict[str, ProxiesModel]


STUDIES: dict[str, type[_Model]] = {"layers": LayersStudy, "fronts": FrontsStudy,
                                    "families": FamiliesStudy, "proxies": ProxiesStudy}
# a study run again under other settings, in its own directory: directory -> study
STUDY_RUNS = {"fronts-speed": "fronts"}


def validate_study(path: str | Path, name: str) -> Any:
    """Read and validate a study's results (studies/DIR/NAME.json) as its model;
    ResultsError (one line) if the renderer cannot use it, FileNotFoundError if absent."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{path}: not JSON ({exc})") from None
    if name not in STUDIES:
        raise ResultsError(f"{path}: no schema for study {name!r} (experiments/results_schema.py)")
    return _check(STUDIES[name], data, "", path)


def spec_for(path: Path) -> FileSpec:
    for pattern, spec in SPECS.items():
        if path.match(pattern):
            return spec
    raise ResultsError(f"{path}: no schema for this results file (experiments/results_schema.py)")


@dataclass(frozen=True)
class Results:
    """A validated file: its protocol and the entries the renderer reads, in file order."""
    path: Path
    protocol: Any
    entries: dict[str, Any]


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _problem(error: dict) -> str:
    msg = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        return "missing (a README section reads it)"
    if error["type"].endswith("_type") or error["type"].endswith("_parsing"):
        value = repr(error["input"])
        value = value if len(value) <= 40 else value[:37] + "..."
        return f"{msg[0].lower() + msg[1:]}, got {type(error['input']).__name__} {value}"
    return msg[0].lower() + msg[1:]


def _check(model: type[BaseModel], data: Any, where: str, path: Path) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        field = (where + _where(first["loc"])).removeprefix(".") or "top level"
        raise ResultsError(f"{path}: {field}: {_problem(first)}{more}") from None


def validate(path: str | Path, spec: FileSpec | None = None) -> Results:
    """Read and validate one results file; ResultsError (one line) if the renderer cannot use it.
    FileNotFoundError if there is no such file."""
    path = Path(path)
    spec = spec or spec_for(path)
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ResultsError(f"{path}: expected an object {{\"protocol\": ..., \"entries\": ...}}, "
                           f"got {type(data).__name__}")
    doc = _check(_Document, data, "", path)
    protocol = _check(spec.protocol, doc.protocol, "protocol", path)
    entries = {}
    for key, value in doc.entries.items():
        if spec.keys and not re.fullmatch(spec.keys, key):
            raise ResultsError(f"{path}: entries[{key!r}]: key does not match {spec.keys}")
        model = spec.entry(key)
        if model is not None:
            entries[key] = _check(model, value, f"entries[{key!r}]", path)
    for key in spec.required:
        if key not in doc.entries:
            raise ResultsError(f"{path}: entries[{key!r}]: missing (a README section reads it)")
    return Results(path, protocol, entries)
