"""Compression plans: a default LayerConfig plus per-layer overrides, versioned JSON on disk.

A plan is keyed like torchao's ``FqnToConfig``: overrides map an exact layer name, or
``re:REGEX`` (full match), to a *partial* LayerConfig that is merged over the default.
Exact names win over regexes; among regexes the first listed that matches wins.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .recovery import RecoveryRecord
from .errors import AutocompressError
from .gguf_types import GGUF_TYPES
from .io_utils import atomic_write_text
from .provenance import Provenance

SCHEMA_VERSION = 2  # 2: provenance (how the weights are made); 1 still loads
READABLE_VERSIONS = (1, 2)
TOP_LEVEL_KEYS = {"schema_version", "model", "default", "overrides", "figures", "provenance",
                  "recovery"}

VALID_BITS = (2, 3, 4, 5, 6, 8, 16)
VALID_GROUP_SIZES = (32, 64, 128, -1)  # -1 = one group per output channel (whole input row)
VALID_METHODS = ("rtn", "gptq", "signround", "imatrix")  # imatrix: GGUF types only
GGUF_METHODS = ("rtn", "imatrix")
# tensors outside the blocks that a plan may give a format, by exact name only (a regex meant
# for the block linears must not reach them); float16 unless an override says otherwise
TABLE_ENTRIES = ("model.embed_tokens", "lm_head")
VALID_PATTERNS = ("unstructured", "2:4")
VALID_PRUNE_METHODS = ("magnitude", "wanda")


@dataclass(frozen=True)
class LayerConfig:
    """How one linear layer is compressed.

    Order of application (fixed): low-rank factorisation (when ``rank_ratio < 1``), then pruning
    of each resulting matrix, then quantization of what remains. See compress/apply.py.

    - ``bits``: 16 leaves weights in float16 (no quantization).
    - ``group_size``: consecutive input columns sharing one scale/zero; -1 = per output channel.
      When it does not divide ``in_features`` the last group of each row is shorter
      (576 columns at 128 = 4 groups of 128 + 1 of 64); bytes count every group.
    - ``sym``: symmetric grid (zero fixed at the centre) or asymmetric (min/max).
    - ``method``: round-to-nearest, GPTQ (needs calibration Hessians) or ``signround``:
      learned rounding, each block's rounding offsets and grid ranges tuned by signed gradient
      descent to match the uncompressed block's output (compress/signround.py; sequential
      calibration; dense layers only; RTN's format, so ``clip`` does not apply: the range is
      learned).
    - ``sparsity``: fraction of weights set to zero; ``pattern`` unstructured or 2:4
      (2:4 forces sparsity 0.5); ``prune_method`` magnitude or Wanda (needs activations).
    - ``rank_ratio``: share of the dense parameter count kept in the low-rank factors
      A (out x r) and B (r x in), r = floor(rank_ratio * out * in / (out + in)); 1.0 = dense.
    - ``gguf``: a GGUF tensor type (``q4_k``, ``q8_0``, ...; see gguf_types.py) instead of the
      native format: the weights are llama.cpp's quantizer's, ``bits``/``group_size``/``sym``
      do not apply, the matrix stays dense and full rank. ``method`` is ``rtn`` (llama.cpp's
      quantizer as ``llama-quantize`` runs it without an importance matrix) or ``imatrix``
      (each weight's error weighted by the mean x² of its input column over the calibration
      windows, as ``llama-imatrix`` computes it). A row that is not a multiple of the type's
      block gets llama.cpp's fallback type.
    - ``clip``: each group's grid range shrunk to the one with the least importance-weighted
      error (compress/quant.py; importance = the input's mean x² where calibration statistics
      exist, as GPTQ always has them). Same format and bytes as the min/max grid; RTN and GPTQ.
    - ``awq``: activation-aware scaling (AWQ): input column j of the weight is multiplied by
      s_j = rms(x_j)^α before quantizing (α searched per layer, compress/awq.py) and the layer
      divides its input by s, so columns that meet large inputs get finer steps. s is stored
      per layer in float16, its bytes counted (2 per input column); RTN, GPTQ and signround
      (its grid learned on the scaled weight), dense and full rank; needs calibration
      statistics.
    """

    bits: int = 16
    group_size: int = 64
    sym: bool = False
    method: str = "rtn"
    sparsity: float = 0.0
    pattern: str = "unstructured"
    prune_method: str = "wanda"
    rank_ratio: float = 1.0
    gguf: str | None = None
    clip: bool = False
    awq: bool = False

    def __post_init__(self) -> None:
        for name in ("clip", "awq"):
            if not isinstance(getattr(self, name), bool):
                raise AutocompressError(f"{name} must be true or false, got "
                                        f"{getattr(self, name)!r}")
        if self.gguf is not None:
            self._check_gguf()
        else:
            if self.clip and (self.bits == 16 or self.method == "signround"):
                # nothing to clip, or a range learned anyway: one spelling per format
                object.__setattr__(self, "clip", False)
            if self.awq and self.bits == 16:
                object.__setattr__(self, "awq", False)  # nothing quantized to scale
        if self.bits not in VALID_BITS:
            raise AutocompressError(f"bits must be one of {VALID_BITS}, got {self.bits!r}")
        if self.group_size not in VALID_GROUP_SIZES:
            raise AutocompressError(
                f"group_size must be one of 32, 64, 128 or -1 (per channel), got {self.group_size!r}"
            )
        if self.method not in VALID_METHODS:
            raise AutocompressError(f"method must be 'rtn', 'gptq' or 'signround' (or 'imatrix' "
                                    f"with a gguf type), got {self.method!r}")
        if self.method == "imatrix" and self.gguf is None:
            raise AutocompressError("method 'imatrix' is llama.cpp's quantizer: it needs a gguf "
                                    "type (e.g. gguf q4_k); native formats use rtn or gptq")
        if self.pattern not in VALID_PATTERNS:
            raise AutocompressError(f"pattern must be 'unstructured' or '2:4', got {self.pattern!r}")
        if self.prune_method not in VALID_PRUNE_METHODS:
            raise AutocompressError(
                f"prune_method must be 'magnitude' or 'wanda', got {self.prune_method!r}"
            )
        for name in ("sparsity", "rank_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise AutocompressError(f"{name} must be a number, got {value!r}")
        if not isinstance(self.sym, bool):
            raise AutocompressError(f"sym must be true or false, got {self.sym!r}")
        if not 0.0 <= float(self.sparsity) <= 0.9:
            raise AutocompressError(f"sparsity must be between 0 and 0.9, got {self.sparsity!r}")
        if self.pattern == "2:4" and self.sparsity not in (0.0, 0.5):
            raise AutocompressError("pattern 2:4 means sparsity 0.5; set --sparsity 0.5 or leave it out")
        if not 0.0 < float(self.rank_ratio) <= 1.0:
            raise AutocompressError(f"rank_ratio must be in (0, 1], got {self.rank_ratio!r}")
        if self.method == "signround" and (self.is_pruned or self.is_low_rank):
            raise AutocompressError("method signround learns the rounding of dense, full-rank "
                                    "weights: set sparsity 0 and rank_ratio 1, or use rtn/gptq")
        if self.awq and (self.is_pruned or self.is_low_rank):
            raise AutocompressError("awq scales the input columns of dense, full-rank RTN, "
                                    "GPTQ or signround weights: set sparsity 0 and rank_ratio 1 "
                                    "with awq")

    def _check_gguf(self) -> None:
        if not isinstance(self.gguf, str) or self.gguf.lower() not in GGUF_TYPES:
            raise AutocompressError(f"gguf must be one of {', '.join(GGUF_TYPES)}, got "
                                    f"{self.gguf!r}")
        # one spelling per format, so equal formats compare (and hash, and cache) equal:
        # the type as llama.cpp's enum spells it, and the native fields that do not apply at
        # their defaults
        object.__setattr__(self, "gguf", self.gguf.lower())
        if self.clip or self.awq:
            raise AutocompressError("clip and awq apply to the native integer grids; llama.cpp's "
                                    "quantizer chooses a gguf type's scales itself")
        for name in ("bits", "group_size", "sym"):
            object.__setattr__(self, name, _NATIVE_DEFAULTS[name])
        if self.method not in GGUF_METHODS:
            raise AutocompressError(f"gguf types are made by llama.cpp's quantizer: method must "
                                    f"be 'rtn' or 'imatrix', got {self.method!r}")
        if self.sparsity or self.pattern == "2:4" or self.rank_ratio != 1.0:
            raise AutocompressError("gguf types store dense, full-rank matrices: set sparsity 0, "
                                    "pattern unstructured and rank_ratio 1 with a gguf type")

    @property
    def effective_sparsity(self) -> float:
        return 0.5 if self.pattern == "2:4" else float(self.sparsity)

    @property
    def is_pruned(self) -> bool:
        return self.effective_sparsity > 0.0

    @property
    def is_low_rank(self) -> bool:
        return self.rank_ratio < 1.0

    @property
    def is_identity(self) -> bool:
        """True when the layer is left as it is (float16, dense, full rank)."""
        return (self.gguf is None and self.bits == 16 and not self.is_pruned
                and not self.is_low_rank)

    @property
    def learns_rounding(self) -> bool:
        """Tuned per block on the block's output (compress/signround.py), not layer by layer."""
        return self.method == "signround" and self.bits < 16

    @property
    def is_gguf(self) -> bool:
        return self.gguf is not None

    def short(self) -> str:
        """Compact human-readable label, e.g. ``4b g64 asym rtn``, ``3b g128 sym gptq 2:4`` or
        ``q4_k imatrix``."""
        if self.gguf is not None:
            return self.gguf + (" imatrix" if self.method == "imatrix" else "")
        if self.bits == 16:
            parts = ["fp16"]
        else:
            g = "ch" if self.group_size == -1 else str(self.group_size)
            parts = [f"{self.bits}b", f"g{g}", "sym" if self.sym else "asym", self.method]
            if self.clip:
                parts.append("clip")
            if self.awq:
                parts.append("awq")
        if self.is_pruned:
            if self.pattern == "2:4":
                parts.append(f"2:4-{self.prune_method}")
            else:
                parts.append(f"s{self.sparsity:.2f}-{self.prune_method}")
        if self.is_low_rank:
            parts.append(f"r{self.rank_ratio:.2f}")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for name in ("clip", "awq"):
            if not data[name]:
                # written only when set: plans, signatures and cache keys from before these
                # options existed stay what they were
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: "LayerConfig | None" = None) -> "LayerConfig":
        """Build from a (possibly partial) dict, filling missing fields from ``base``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise AutocompressError(
                f"unknown LayerConfig field(s) {sorted(unknown)}; known: {sorted(known)}"
            )
        merged = (base or cls()).to_dict()
        merged.update(data)
        if isinstance(merged.get("group_size"), str) and merged["group_size"] in ("channel", "-1"):
            merged["group_size"] = -1
        return cls(**merged)


_NATIVE_DEFAULTS = {"bits": 16, "group_size": 64, "sym": False}


@dataclass
class ModelIdentity:
    """Which model a plan was made for: a name and a hash of the layer names and shapes."""

    name: str
    content_hash: str
    layers: dict[str, list[int]] = field(default_factory=dict)  # name -> [out, in]
    source: str = ""  # what --model was given (alias or path), to reload it later


@dataclass
class Plan:
    model: ModelIdentity
    default: LayerConfig = field(default_factory=LayerConfig)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)  # predicted / measured, free-form
    # how the weights are made (calibration, GPTQ settings); None only for v1 plans
    provenance: Provenance | None = field(default_factory=Provenance)
    # tensors trained after the build (recovery.py), in a file beside the plan
    recovery: RecoveryRecord | None = None
    # where the plan was loaded from (its recovered tensors are there); not saved
    directory: Path | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for key, partial in self.overrides.items():
            if key.startswith("re:"):
                try:
                    re.compile(key[3:])
                except re.error as exc:
                    raise AutocompressError(f"override {key!r} is not a valid regex: {exc}") from None
            if not isinstance(partial, dict):
                raise AutocompressError(f"override {key!r} must be an object of LayerConfig "
                                        f"fields, got {partial!r}")
            try:
                if key in TABLE_ENTRIES:
                    check_table(LayerConfig.from_dict(partial))
                else:
                    LayerConfig.from_dict(partial, self.default)  # validate early
            except AutocompressError as exc:
                raise AutocompressError(f"override {key!r}: {exc}") from None

    # -- resolution ---------------------------------------------------------------------------
    def config_for(self, layer_name: str) -> LayerConfig:
        """The LayerConfig that applies to ``layer_name`` (exact override > first regex > default).
        The embedding and an untied head (TABLE_ENTRIES) take an exact override or float16."""
        if layer_name in TABLE_ENTRIES:
            return LayerConfig.from_dict(self.overrides.get(layer_name, {}))
        if layer_name in self.overrides:
            return LayerConfig.from_dict(self.overrides[layer_name], self.default)
        for key, partial in self.overrides.items():
            if key.startswith("re:") and re.fullmatch(key[3:], layer_name):
                return LayerConfig.from_dict(partial, self.default)
        return self.default

    def resolve(self, layer_names: Iterable[str]) -> dict[str, LayerConfig]:
        return {name: self.config_for(name) for name in layer_names}

    def resolve_model(self, loaded) -> dict[str, LayerConfig]:
        """Configs of a model.LoadedModel's block linears, plus those of its embedding and
        untied head that the plan compresses (the others are float16: left out)."""
        return {**self.resolve(layer.name for layer in loaded.layers),
                **table_configs(self, [table.name for table in loaded.tables])}

    # -- checks -------------------------------------------------------------------------------
    def check_model(self, identity: ModelIdentity) -> None:
        """Fail, naming the layers that differ, when this plan was made for another model."""
        if identity.content_hash == self.model.content_hash:
            return
        mine, theirs = self.model.layers, identity.layers
        missing = sorted(set(mine) - set(theirs))
        extra = sorted(set(theirs) - set(mine))
        reshaped = sorted(n for n in set(mine) & set(theirs) if list(mine[n]) != list(theirs[n]))
        details = []
        for label, names in (("missing from model", missing), ("not in plan", extra),
                             ("different shape", reshaped)):
            if names:
                shown = ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
                details.append(f"{len(names)} {label}: {shown}")
        detail = "; ".join(details) or "layer hash differs"
        raise AutocompressError(
            f"plan was made for model {self.model.name!r}, not {identity.name!r} ({detail}); "
            "make a new plan for this model"
        )

    def check_override_names(self, layer_names: Iterable[str], tables: Iterable[str] = ()
                             ) -> None:
        """Overrides must reach real layers: an exact name that is not a layer, or a regex
        that matches none, would otherwise do nothing (a typo the user never hears of).
        ``tables``: the model's entries outside the blocks (its embedding, an untied head)."""
        names = list(layer_names)
        tables = set(tables)
        if "lm_head" in self.overrides and "lm_head" not in tables:
            raise AutocompressError("this model's head is tied to its embedding (one tensor): "
                                    "give the format to 'model.embed_tokens' instead of 'lm_head'")
        known = set(names) | tables
        bad = [k for k in self.overrides if not k.startswith("re:") and k not in known]
        if bad:
            raise AutocompressError(f"plan overrides name unknown layer(s): {', '.join(bad[:5])}")
        idle = [k for k in self.overrides if k.startswith("re:")
                and not any(re.fullmatch(k[3:], name) for name in names)]
        if idle:
            raise AutocompressError(
                f"plan override(s) {', '.join(repr(k) for k in idle[:5])} match no layer of the "
                f"model (regexes must match a whole name, e.g. {names[0]!r}); fix or remove them")

    # -- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {
            # a plan without provenance (read from v1) is still a v1 plan
            "schema_version": SCHEMA_VERSION if self.provenance is not None else 1,
            "model": dataclasses.asdict(self.model),
            "default": self.default.to_dict(),
            "overrides": self.overrides,
        }
        if self.provenance is not None:
            out["provenance"] = self.provenance.to_dict()
        if self.recovery is not None:
            out["recovery"] = self.recovery.to_dict()
        out["figures"] = self.figures
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        if not isinstance(data, dict):
            raise AutocompressError("plan JSON must be an object")
        version = data.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise AutocompressError(
                f"plan schema_version {version!r} is not supported (this version reads "
                f"{', '.join(map(str, READABLE_VERSIONS))}); make the plan again")
        unknown = sorted(set(data) - TOP_LEVEL_KEYS)
        if unknown:
            raise AutocompressError(f"plan has unknown top-level key(s) {unknown}; known: "
                                    f"{sorted(TOP_LEVEL_KEYS)}")
        if version == 1 and "provenance" in data:
            raise AutocompressError("a schema_version 1 plan has no provenance; set "
                                    "schema_version 2 or remove it")
        if version >= 2 and "provenance" not in data:
            raise AutocompressError("a schema_version 2 plan needs its provenance (how its "
                                    "weights are made); make the plan again")
        provenance = Provenance.from_dict(data["provenance"]) if version >= 2 else None
        recovery = RecoveryRecord.from_dict(data["recovery"]) if "recovery" in data else None
        try:
            model = ModelIdentity(**data["model"])
            try:
                default = LayerConfig.from_dict(data.get("default", {}))
            except AutocompressError as exc:
                raise AutocompressError(f"plan default: {exc}") from None
            if not isinstance(data.get("overrides", {}), dict):
                raise AutocompressError("plan overrides must be an object of layer name (or "
                                        "re:REGEX) to LayerConfig fields")
            # a v1 plan is read as it was written; saving it again writes schema 2
            return cls(model=model, default=default, overrides=dict(data.get("overrides", {})),
                       figures=dict(data.get("figures", {})), provenance=provenance,
                       recovery=recovery)
        except (KeyError, TypeError, ValueError) as exc:
            raise AutocompressError(f"plan is missing or has malformed fields ({exc})") from None

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise AutocompressError(f"plan file {str(path)!r} not found")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AutocompressError(f"plan file {str(path)!r} is not valid JSON ({exc})") from None
        plan = cls.from_dict(data)
        plan.directory = path.resolve().parent
        return plan

    def recovered_tensors(self) -> dict | None:
        """The recovered tensors (checked against the record), or None without recovery."""
        if self.recovery is None:
            return None
        from .recovery import load_tensors

        return load_tensors(self.recovery, self.directory)


def check_table(cfg: LayerConfig) -> None:
    """The embedding and head are stored as float16 or a GGUF type (llama.cpp's own choice for
    them); llama.cpp has no importance matrix for the embedding's lookups."""
    if not (cfg.is_identity or cfg.is_gguf):
        raise AutocompressError("the embedding and head take a gguf type (e.g. gguf q6_k) or "
                                f"float16, not {cfg.short()}")
    if cfg.method == "imatrix":
        raise AutocompressError("the embedding and head are quantized without an importance "
                                "matrix: use method rtn")


def table_configs(plan: "Plan", tables: Iterable[str]) -> dict[str, LayerConfig]:
    """The configs of the entries outside the blocks that the plan compresses (float16 ones
    are left out: they are the model as it is)."""
    configs = {name: plan.config_for(name) for name in tables}
    return {name: cfg for name, cfg in configs.items() if not cfg.is_identity}


def compact_overrides(configs: dict[str, LayerConfig], default: LayerConfig) -> dict[str, dict]:
    """Per-layer configs -> minimal overrides: only the fields that differ from ``default``."""
    out: dict[str, dict] = {}
    # every field compared (to_dict leaves clip out when false, which a default with clip
    # set must still be told)
    base = dataclasses.asdict(default)
    for name, cfg in configs.items():
        diff = {k: v for k, v in dataclasses.asdict(cfg).items() if base[k] != v}
        if diff:
            out[name] = diff
    return out


def uniform_plan(model: ModelIdentity, config: LayerConfig,
                 provenance: Provenance | None = None) -> Plan:
    """Every block linear at ``config``: the baselines users compare searched plans against."""
    return Plan(model=model, default=config, figures={"kind": "uniform"},
                provenance=provenance or Provenance())
