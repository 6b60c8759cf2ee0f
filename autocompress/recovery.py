"""A plan's recovered tensors: what distillation recovery (compress/recover.py) trained, kept in
a safetensors file beside the plan and named in it, so that every build of the plan (apply,
eval, the packed runtime) puts the same trained scales and norms into the model it builds.

The plan records the file's name and SHA-256, and how the tensors were trained; a build
refuses a missing or altered file with one line rather than building the plan without them.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import AutocompressError

if TYPE_CHECKING:
    import torch

TENSORS_FILE = "recovered.safetensors"
METHODS = ("kd",)


SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class KDSettings:
    """Defaults from experiments/recovery.py on SmolLM2's searched 3-bit plan: its 8
    calibration windows, 200 steps at a constant 1e-3 took 8.6% off held-out KL; 64 windows,
    400 steps, cosine from 2e-3 took 24.9%; 128 windows and 600 steps 31.2%, at half as much
    time again (and more windows than a short calibration text holds)."""

    steps: int = 400
    lr: float = 2e-3  # Adam's step on log-scales (relative) and on norm weights (absolute)
    eval_every: int = 20
    patience: int = 3
    checkpoint_every: int = 20
    seed: int = 0
    val_windows: int = 8  # the calibration text's windows after the training ones
    # the calibration text's first N windows (the plan's among them): a plan's few
    # calibration windows, seen for many steps, over-fit; None: the plan's windows only
    train_windows: int | None = 64
    # the learning rate over the run: constant, or cosine-decayed from lr to 0 at ``steps``
    # (the late steps then refine instead of jumping around the optimum)
    schedule: str = "cosine"
    # a rate that undoes the plan is not the plan's rate: when the first validation is no
    # better than the start, the run starts over from the plan at a quarter of the rate, at
    # most this many times (SmolLM2: 2e-3 suits the searched 3-bit plan; its 4-bit plan,
    # closer to the model, rose at once and needed 5e-4, experiments/recovery.py)
    lr_backoffs: int = 2
    # a stall is not always the end: at a rate too large for the late steps, held-out KL stops
    # improving long before the cosine has decayed it. At most this many times a stall goes
    # back to the best state and on at a quarter of the rate instead of stopping (0: stop)
    plateau_backoffs: int = 0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise AutocompressError(f"KD schedule must be one of {', '.join(SCHEDULES)}, got "
                                    f"{self.schedule!r}")
        for name in ("steps", "eval_every", "patience", "checkpoint_every", "val_windows",
                     "train_windows"):
            value = getattr(self, name)
            if name == "train_windows" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise AutocompressError(f"KD {name} must be a positive integer, got {value!r}")
        for name in ("lr_backoffs", "plateau_backoffs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise AutocompressError(f"KD {name} must be a whole number, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise AutocompressError(f"KD learning rate must be in (0, 1), got {self.lr!r}")


@dataclass(frozen=True)
class RecoveryRecord:
    """How a plan's recovered tensors were made, and what they did on held-out windows."""

    method: str
    sha256: str
    steps: int  # steps run (early stopping may end before the requested number)
    best_step: int
    lr: float  # the rate the tensors were trained at (after any back-off)
    seed: int
    train_windows: int  # the calibration text's first (the plan's calibration windows unless
    # --kd-train-windows asked for more)
    val_windows: int  # the calibration text's windows right after them (early stopping)
    kl_before: float  # on the validation windows, as built
    kl_after: float  # with the recovered tensors, float16 scales
    tensors: str = TENSORS_FILE
    schedule: str = "constant"  # the learning rate's (plans before it existed: constant)
    # rates started and abandoned because the first validation was no better (back-off)
    lr_abandoned: list[float] = field(default_factory=list)
    # steps at which a stall sent the run back to its best state at a quarter of the rate
    lr_lowered_at: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise AutocompressError(f"plan recovery method must be one of {METHODS}, got "
                                    f"{self.method!r}")
        if "/" in self.tensors or "\\" in self.tensors or self.tensors in ("", ".", ".."):
            raise AutocompressError(f"plan recovery tensors must be a file name beside the "
                                    f"plan, got {self.tensors!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "RecoveryRecord":
        if not isinstance(data, dict):
            raise AutocompressError("plan recovery must be an object")
        try:
            return cls(**data)
        except TypeError as exc:
            raise AutocompressError(f"plan recovery is malformed ({exc})") from None

    def describe(self) -> str:
        backoff = (f", at {self.lr:g} after {', '.join(f'{r:g}' for r in self.lr_abandoned)} "
                   "made it worse" if self.lr_abandoned else "")
        if self.lr_lowered_at:
            backoff += (f", rate quartered at step{'s' if len(self.lr_lowered_at) > 1 else ''} "
                        f"{', '.join(map(str, self.lr_lowered_at))} (stalled)")
        return (f"{self.method} recovery ({self.steps} steps{backoff}): held-out KL "
                f"{self.kl_before:.4f} -> {self.kl_after:.4f}")


def tensors_bytes(tensors: "dict[str, torch.Tensor]") -> bytes:
    from safetensors.torch import save

    return save({name: t.detach().cpu().contiguous() for name, t in sorted(tensors.items())})


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_tensors(record: RecoveryRecord, directory: Path | None) -> "dict[str, torch.Tensor]":
    """The recovered tensors of a plan loaded from ``directory``, checked against the record."""
    from safetensors.torch import load

    if directory is None:
        raise AutocompressError("this plan has recovered tensors, which live in a file beside "
                                "its plan.json: load the plan from its file")
    path = Path(directory) / record.tensors
    if not path.is_file():
        raise AutocompressError(f"the plan's recovered tensors {path} are missing: copy "
                                f"{record.tensors} beside the plan, or recover again")
    data = path.read_bytes()
    if digest(data) != record.sha256:
        raise AutocompressError(f"{path} is not the file the plan recorded (SHA-256 differs): "
                                "restore it, or recover again")
    try:
        return load(data)
    except Exception as exc:  # noqa: BLE001 - a corrupt file is one line
        raise AutocompressError(f"{path} cannot be read ({exc}); recover again") from None
