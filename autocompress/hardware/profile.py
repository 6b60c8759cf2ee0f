"""Device profiles (autocompress/hw_profiles/NAME.yaml, package data): what a device holds and
how fast it runs each format.

A profile is plain data, validated with pydantic (unknown keys, missing fields and impossible
values are refused with one line naming the field). Published figures carry a ``sources`` entry;
figures measured by ``autocompress profile`` say so in theirs.

Formats are named by how a layer is stored: ``f32``, ``bf16``, ``f16`` (floats), ``q2`` ... ``q8``
(group-quantized integers), with ``+2:4`` appended for 2:4-sparse storage and ``+sparse`` for
unstructured sparsity (a bitmap). ``formats`` lists the
ones with a fast kernel on the profile's engine and the share of the memory bandwidth that kernel
achieves; anything else runs through the ``fallback`` path (dequantize, then a float matmul).
"""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import AutocompressError
from ..units import parse_size

SCHEMA_VERSION = 1
FORMAT_NAME = re.compile(r"^(f32|bf16|f16|q[2-6]|q8)(\+2:4|\+sparse)?$")
FLOAT_DTYPES = ("f32", "bf16", "f16")

# Where `--device jetson` and friends lead; `devices` prints this table.
ALIASES = {
    "jetson": "jetson-orin-nano-8gb",
    "jetson-super": "jetson-orin-nano-8gb-super",
    "orin-nano": "jetson-orin-nano-8gb",
    "pi": "raspberry-pi-5-8gb",
    "m2": "apple-m2",
    "4090": "rtx-4090",
    "a100": "a100-40gb",
    "h100": "h100-sxm",
}


class _Strict(BaseModel):
    # a NaN or infinite speed would pass every `> 0` check and poison each prediction
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Memory(_Strict):
    capacity: int = Field(description="physical memory the model shares (bytes; YAML may say 8GB)")
    usable_fraction: float = Field(gt=0, le=1, description="share a model may take (OS, display, "
                                   "runtime take the rest on unified-memory devices)")
    bandwidth_gbps: float = Field(gt=0, description="peak memory bandwidth, GB/s (1e9 bytes/s)")
    measured_copy_gbps: float | None = Field(default=None, gt=0,
                                             description="achieved copy bandwidth, if measured")
    runtime_overhead: int = Field(default=0, description="bytes the runtime itself holds "
                                  "(CUDA context, interpreter, kernels' workspaces)")

    @field_validator("capacity", "runtime_overhead", mode="before")
    @classmethod
    def _size(cls, value):
        return 0 if value in (0, "0") else parse_size(value)

    @property
    def usable_bytes(self) -> int:
        return int(self.capacity * self.usable_fraction)


class Compute(_Strict):
    peak_tflops: dict[str, float] = Field(description="dense peak per dtype: f32, f16, bf16, int8")
    sparse_2_4: bool = Field(description="hardware speeds up 2:4 structured sparsity")
    float_dtype: Literal["f32", "bf16", "f16"] = Field(
        default="f16", description="the float dtype unquantized layers run in on this engine")

    @field_validator("peak_tflops")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        for dtype, tflops in value.items():
            if dtype not in ("f32", "f16", "bf16", "int8", "int4"):
                raise ValueError(f"unknown dtype {dtype!r} (f32, f16, bf16, int8, int4)")
            if tflops <= 0:
                raise ValueError(f"peak_tflops.{dtype} must be positive, got {tflops}")
        if not value:
            raise ValueError("give at least one dtype's peak")
        return value


class FormatSpeed(_Strict):
    efficiency: float = Field(gt=0, le=1, description="achieved / peak memory bandwidth at decode")
    compute_efficiency: float = Field(default=0.5, gt=0, le=1,
                                      description="achieved / peak throughput when compute-bound")
    held_as: str | None = Field(default=None, description=(
        "the dense format the engine keeps layers of this format in, when its fast kernel "
        "needs another container (3-bit codes widened to 4, 2:4 weights densified)"))
    resident_ratio: float = Field(default=1.0, gt=0, description=(
        "bytes the engine holds per byte of the (held) format's accounting: its own layout "
        "(prepacked weights, float32 scales), measured by `autocompress profile`"))

    @field_validator("held_as")
    @classmethod
    def _held(cls, value: str | None) -> str | None:
        if value is not None and "+" in check_format_name(value):
            raise ValueError(f"held_as must be a dense format, got {value!r}")
        return value


class Fallback(_Strict):
    """Formats without a fast kernel: dequantize to the float dtype, then a float matmul."""
    efficiency: float = Field(gt=0, le=1, description="achieved / peak bandwidth on packed bytes")


class Overhead(_Strict):
    launch_us: float = Field(ge=0, description="fixed cost of one kernel launch / op dispatch")
    block_us: float | None = Field(default=None, ge=0, description=(
        "non-matmul work of one transformer block at decode (norms, rope, attention, residuals); "
        "default: 12 launches"))
    token_us: float = Field(default=0.0, ge=0, description="per decoded token outside the blocks")


class LookupEntry(_Strict):
    """A measured latency: one linear layer of this format and shape, over ``tokens`` rows, at
    ``group_size`` (other group sizes scale it by their bytes)."""
    format: str
    group_size: int | None = None
    out_features: int = Field(gt=0)
    in_features: int = Field(gt=0)
    tokens: int = Field(default=1, gt=0)
    seconds: float = Field(gt=0)

    @field_validator("format")
    @classmethod
    def _format(cls, value: str) -> str:
        return check_format_name(value)


class PublishedDecode(_Strict):
    """A published decode speed on this device, kept to validate the latency model against.
    The run's format is given as a uniform plan: every block linear at ``bits``/``group_size``,
    the embedding and head at ``head_format``."""
    model: str
    config: str = Field(description="config.json of the model, relative to experiments/configs/")
    bits: int = Field(ge=2, le=16)
    group_size: int
    sym: bool = True
    head_format: str = Field(default="f16", description="format of the embedding and LM head")
    tokens_per_s: float = Field(gt=0)
    context: int = Field(default=128, gt=0, description="tokens in the KV cache while decoding")
    engine: str
    power_mode: str | None = None
    source: str

    @field_validator("head_format")
    @classmethod
    def _head(cls, value: str) -> str:
        return check_format_name(value)


class Source(_Strict):
    field: str = Field(description="dotted path of the figure, e.g. memory.bandwidth_gbps")
    url: str | None = None
    note: str | None = None

    @model_validator(mode="after")
    def _something(self):
        if not (self.url or self.note):
            raise ValueError(f"source for {self.field!r} needs a url or a note")
        return self


class DeviceProfile(_Strict):
    schema_version: Literal[1]
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    description: str
    kind: Literal["cpu", "gpu", "soc-gpu", "soc-cpu"]
    engine: str = Field(description="the runtime the speeds refer to (MLC, llama.cpp, torch+ORT...)")
    power_mode: str | None = None
    measured: bool = Field(default=False, description="written by `autocompress profile`")
    memory: Memory
    compute: Compute
    formats: dict[str, FormatSpeed]
    fallback: Fallback
    overhead: Overhead
    lookup: list[LookupEntry] = Field(default_factory=list)
    published: list[PublishedDecode] = Field(default_factory=list)
    sources: list[Source]

    @field_validator("formats")
    @classmethod
    def _format_names(cls, value: dict[str, FormatSpeed]) -> dict[str, FormatSpeed]:
        for name in value:
            check_format_name(name)
        return value

    @model_validator(mode="after")
    def _sourced(self):
        # Every published figure needs a source; a measured profile's sources say "measured".
        needed = ["memory.capacity", "memory.bandwidth_gbps"]
        needed += [f"compute.peak_tflops.{d}" for d in self.compute.peak_tflops]
        cited = {s.field for s in self.sources}
        missing = [f for f in needed
                   if not any(f == c or f.startswith(c + ".") for c in cited)]
        if missing:
            raise ValueError(f"no sources entry for {', '.join(missing)}")
        if self.compute.float_dtype not in self.formats:
            raise ValueError(f"formats must list the float dtype {self.compute.float_dtype!r}")
        return self

    def format_speed(self, fmt: str) -> FormatSpeed | None:
        return self.formats.get(fmt)

    @property
    def block_overhead_s(self) -> float:
        us = self.overhead.block_us if self.overhead.block_us is not None \
            else 12 * self.overhead.launch_us
        return us * 1e-6


def check_format_name(name: str) -> str:
    if not FORMAT_NAME.match(name):
        raise ValueError(f"unknown format {name!r}: f32, bf16, f16, q2..q6 or q8, "
                         "optionally followed by +2:4 or +sparse")
    return name


# ----------------------------------------------------------------------------------------------
# Loading


def profiles_dir() -> Path:
    """The bundled device profiles: package data (autocompress/hw_profiles/), so they are there
    in a wheel or a non-editable install as well as in a checkout."""
    return Path(str(files("autocompress") / "hw_profiles"))


def available_profiles(directory: Path | None = None) -> dict[str, Path]:
    directory = directory or profiles_dir()
    return {p.stem: p for p in sorted(directory.glob("*.yaml"))}


def resolve_device(device: str, directory: Path | None = None) -> tuple[Path, str | None]:
    """(profile path, note) for a name, an alias or a path. The note says what an alias chose."""
    path = Path(device)
    if device.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise AutocompressError(f"device profile {device} does not exist; "
                                    "write one with `autocompress profile --out FILE`")
        return path, None
    known = available_profiles(directory)
    if device in known:
        return known[device], None
    if device in ALIASES and ALIASES[device] in known:
        target = ALIASES[device]
        return known[target], f"--device {device} means {target} (see `autocompress devices`)"
    names = ", ".join(sorted(known)) or "none"
    raise AutocompressError(
        f"unknown device {device!r}: use one of {names}, an alias ({', '.join(sorted(ALIASES))}) "
        "or a path to a profile YAML (`autocompress devices` lists them)")


def load_device(device: str | Path, directory: Path | None = None
                ) -> tuple[DeviceProfile, str | None]:
    """The profile of a name, alias or path, and the line saying what an alias chose."""
    path, note = resolve_device(str(device), directory)
    return read_profile(path), note


def load_profile(device: str | Path, directory: Path | None = None) -> DeviceProfile:
    return load_device(device, directory)[0]


def read_profile(path: Path) -> DeviceProfile:
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise AutocompressError(f"cannot read device profile {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise AutocompressError(f"device profile {path} is not a text (YAML) file; measure one "
                                "with `autocompress profile`") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise AutocompressError(f"device profile {path} is not valid YAML{where}; "
                                "fix it or measure a new one with `autocompress profile`") from None
    if not isinstance(raw, dict):
        raise AutocompressError(f"device profile {path} must be a YAML mapping of fields")
    if raw.get("schema_version") not in (None, SCHEMA_VERSION):
        raise AutocompressError(
            f"device profile {path} has schema_version {raw.get('schema_version')!r}; this "
            f"autocompress reads version {SCHEMA_VERSION}")
    try:
        return DeviceProfile.model_validate(raw)
    except ValidationError as exc:
        raise AutocompressError(f"device profile {path} is invalid: {_first_error(exc)}") from None
    except AutocompressError as exc:  # parse_size of memory.capacity
        raise AutocompressError(f"device profile {path} is invalid: memory.capacity: {exc}") from None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err["loc"]) or "(top level)"
    kind = err["type"]
    if kind == "missing":
        return f"missing field {where}"
    if kind == "extra_forbidden":
        return f"unknown key {where} (a typo? see autocompress/hw_profiles/ for the fields)"
    message = err["msg"].removeprefix("Value error, ")
    return f"{where}: {message}"


def profile_to_yaml(profile: DeviceProfile) -> str:
    data = profile.model_dump(mode="json", exclude_none=True)
    return yaml.safe_dump(data, sort_keys=False, width=100)
