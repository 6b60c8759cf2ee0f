"""How a plan's weights are made, beyond each layer's format: the part of a plan that ``apply``,
``eval`` and ``export`` must reproduce for their figures to be the search's.

A plan's formats (bits, groups, sparsity, rank) say *what* is stored; GPTQ, Wanda and whitened
low rank also depend on *how* they were calibrated: which text, how many windows, whether each
block's statistics were taken through the already-compressed prefix (sequential) or from the
uncompressed model (parallel), and GPTQ's damping and column order. At 3 bits on SmolLM2 the
same uniform GPTQ plan measures 62.2 (sequential) or 75.9 (parallel) test perplexity, so a plan
that does not record this is not reproducible.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .errors import AutocompressError
from .placement import DTYPES

MODES = ("sequential", "parallel")
IMPORTANCE = ("E[x xᵀ] of each layer's input over the calibration windows (GPTQ's Hessian, "
              "Wanda's ‖X_j‖₂, the whitening of low rank)")


@dataclass(frozen=True)
class Provenance:
    """Everything besides the formats that decides a plan's weights.

    ``calib_text`` is the calibration file's absolute path, or None for the embedded pydoc
    corpus; ``calib_digest`` identifies the token windows taken from it (checked on reuse).
    """

    calib_text: str | None = None
    calib_windows: int = 16
    window_len: int = 512
    calib_digest: str | None = None
    mode: str = "sequential"
    gptq_damp: float = 0.01
    gptq_act_order: bool = True
    gptq_block_size: int = 128
    gptq_static_groups: bool = True  # groups fixed before reordering: the format is unchanged
    importance: str = IMPORTANCE
    # a layer whose GGUF type is the one the source GGUF stores it in keeps the stored bytes,
    # as llama-quantize does (gguf_source.py); plans that predate the field requantized them
    gguf_source_copy: bool = True
    # the dtype the model was loaded and computed in (statistics, GPTQ, the measured KLs);
    # plans that predate the field were all computed in float32
    compute_dtype: str = "float32"
    tool_version: str = __version__
    made_by: str = "plan"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise AutocompressError(f"provenance mode must be sequential or parallel, got "
                                    f"{self.mode!r}")
        for name in ("calib_windows", "window_len", "gptq_block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise AutocompressError(f"provenance {name} must be a positive integer, got "
                                        f"{value!r}")
        if not 0.0 <= float(self.gptq_damp) < 1.0:
            raise AutocompressError(f"provenance gptq_damp must be in [0, 1), got "
                                    f"{self.gptq_damp!r}")
        if not isinstance(self.gguf_source_copy, bool):
            raise AutocompressError(f"provenance gguf_source_copy must be true or false, got "
                                    f"{self.gguf_source_copy!r}")
        if self.compute_dtype not in DTYPES:
            raise AutocompressError(f"provenance compute_dtype must be one of "
                                    f"{', '.join(DTYPES)}, got {self.compute_dtype!r}")
        if not self.gptq_static_groups:
            raise AutocompressError("provenance gptq_static_groups must be true: this version "
                                    "only makes static groups")

    @property
    def calib_label(self) -> str:
        return "the embedded pydoc corpus" if self.calib_text is None else \
            Path(self.calib_text).name

    def describe(self) -> str:
        """One line for the terminal: what apply/eval are about to reproduce."""
        gptq = (f"GPTQ damp {self.gptq_damp:g}, {'act-order' if self.gptq_act_order else 'in order'}")
        dtype = "" if self.compute_dtype == "float32" else f"; computed in {self.compute_dtype}"
        return (f"{self.mode} calibration on {self.calib_windows} windows of {self.window_len} "
                f"tokens of {self.calib_label}; {gptq}{dtype}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "Provenance":
        if not isinstance(data, dict):
            raise AutocompressError("plan provenance must be an object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AutocompressError(f"plan provenance has unknown field(s) {unknown}; known: "
                                    f"{sorted(known)}")
        data = {"gguf_source_copy": False, **data}  # recorded before the field: built without
        try:
            return cls(**data)
        except TypeError as exc:
            raise AutocompressError(f"plan provenance is malformed ({exc})") from None

    def gptq_settings(self):
        from .compress.weights import GPTQSettings

        return GPTQSettings(damp=self.gptq_damp, act_order=self.gptq_act_order,
                            block_size=self.gptq_block_size)


# A v1 plan (or one without provenance) is applied the way this tool always applied plans.
LEGACY = Provenance(made_by="unknown (schema v1 plan)", gguf_source_copy=False)


@dataclass
class BuildOverrides:
    """What the user asked for on the command line instead of the plan's record."""

    calib_text: str | None = None
    calib_windows: int | None = None
    window_len: int | None = None
    mode: str | None = None
    compute_dtype: str | None = None


def resolve(recorded: Provenance | None, overrides: BuildOverrides | None = None
            ) -> tuple[Provenance, list[str]]:
    """The provenance to build with: the plan's, with any command-line overrides, and the lines
    that tell the user what is being reproduced (or what departs from the plan)."""
    base = recorded or LEGACY
    notes = []
    if recorded is None:
        notes.append("this plan records no provenance (schema v1): built the default way, "
                     f"{base.describe()}")
    changes: dict[str, Any] = {}
    if overrides is not None:
        if overrides.calib_text is not None:
            if not Path(overrides.calib_text).is_file():
                raise AutocompressError(f"--calib-text: text file {overrides.calib_text!r} "
                                        "not found")
            path = str(Path(overrides.calib_text).resolve())
            if path != base.calib_text:
                changes["calib_text"] = path
        for name in ("calib_windows", "window_len", "mode"):
            value = getattr(overrides, name)
            if value is not None and value != getattr(base, name):
                changes[name] = value
    if overrides is not None and overrides.compute_dtype not in (None, base.compute_dtype):
        notes.append(dtype_note(base, overrides.compute_dtype))
        base = dataclasses.replace(base, compute_dtype=overrides.compute_dtype)
        if not changes:
            return base, notes
    if changes:
        same_windows = not {"calib_text", "calib_windows", "window_len"} & set(changes)
        built = dataclasses.replace(base, **changes,
                                    calib_digest=base.calib_digest if same_windows else None)
        if recorded is not None:
            said = ", ".join(f"{k} {v}" for k, v in changes.items())
            notes.append(f"overriding the plan's provenance ({said}): the weights will differ "
                         "from those the search measured")
        return built, notes
    if recorded is not None:
        notes.append(f"reproducing the plan's provenance: {base.describe()}")
    return base, notes


def dtype_note(recorded: Provenance, compute_dtype: str) -> str:
    return (f"computing in {compute_dtype}, not the plan's {recorded.compute_dtype}: the figures "
            "will differ from those the search measured")


def calibration_windows(tokenizer: Any, provenance: Provenance):
    """The calibration windows the provenance names, checked against its digest."""
    from .data import calibration_data

    if provenance.calib_text is not None and not Path(provenance.calib_text).is_file():
        raise AutocompressError(
            f"the plan was calibrated on {provenance.calib_text}, which is not there; pass "
            "--calib-text with that text (its windows are checked against the plan's digest)")
    data = calibration_data(tokenizer, provenance.calib_text, provenance.calib_windows, 0,
                            provenance.window_len)
    if provenance.calib_digest is not None and data.digest != provenance.calib_digest:
        raise AutocompressError(
            f"the calibration windows of {provenance.calib_label} differ from the plan's "
            f"(digest {data.digest}, plan {provenance.calib_digest}): the text changed; pass "
            "--calib-text/--calib-windows to calibrate on it anyway (figures will differ)")
    return data.calib
