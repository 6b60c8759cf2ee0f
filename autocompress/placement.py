"""Where and in what precision the tool computes: ``--compute-device`` and ``--dtype``.

A ``Placement`` is the device every stage computes on (calibration statistics, Fisher and
Hessian proxies, GPTQ, Wanda, SVD, KL evaluation, the search's levels) and the dtype the model is
loaded and run in. ``auto`` means: the first CUDA device when torch has one, else the CPU; on a
GPU the model's own precision (its config's ``torch_dtype``, bfloat16 for most checkpoints), on
a CPU float32 (on SmolLM2 a bfloat16 forward alone adds a KL of 1.1e-3 nats, as much as an
8-bit plan measures: experiments/results/dtype.json; ``--dtype bfloat16`` is there for models
too big for float32 and low-bit searches).

Nothing moves to another device without being asked: stages allocate on the device of the
model's weights (``model_device``), and token windows are put there on entry. The few steps
that are CPU-only by nature (llama.cpp's quantizers, numpy GPTQ sweeps on a CPU) say so where
they transfer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .dtype_names import DTYPE_CHOICES, DTYPE_NAMES
from .errors import AutocompressError

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
_DEVICE = re.compile(r"^(auto|cpu|meta|cuda(:\d+)?)$")


@dataclass(frozen=True)
class Placement:
    """The compute device and the dtype the model is loaded and run in."""

    device: torch.device
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    def describe(self) -> str:
        return f"{self.device}, {self.dtype_name}"

    def worker_spec(self) -> dict[str, str]:
        """What a Ray worker needs to place its own copy of the model: the device *type* (a
        worker given a GPU sees it as cuda:0) and the dtype."""
        return {"device": self.device.type, "dtype": self.dtype_name}


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    return str(dtype).removeprefix("torch.")


def parse_dtype(text: str | torch.dtype) -> torch.dtype | None:
    """A dtype from its name (None for ``auto``); a clear error for anything else."""
    if isinstance(text, torch.dtype):
        return text
    if text == "auto":
        return None
    if text not in DTYPES:
        raise AutocompressError(f"unknown dtype {text!r}: choose from {', '.join(DTYPE_CHOICES)}")
    return DTYPES[text]


def parse_device(text: str | torch.device) -> torch.device:
    """The compute device asked for, checked against what this torch can reach."""
    if isinstance(text, torch.device):
        text = str(text)
    text = text.strip().lower()
    if not _DEVICE.match(text):
        raise AutocompressError(f"unknown compute device {text!r}: use auto, cpu, cuda or "
                                "cuda:N")
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise AutocompressError(
                f"--compute-device {text}: this torch ({torch.__version__}) sees no CUDA device "
                "(a CPU build, or no GPU visible); use --compute-device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise AutocompressError(
                f"--compute-device {text}: torch sees {torch.cuda.device_count()} CUDA "
                f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def stored_dtype(hf_dir: Path) -> torch.dtype | None:
    """The precision a HF checkpoint stores its weights in, from its config.json."""
    try:
        config = json.loads((Path(hf_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = config.get("torch_dtype") or config.get("dtype")
    return DTYPES.get(name) if isinstance(name, str) else None


def resolve_placement(compute_device: str | torch.device = "auto",
                      dtype: str | torch.dtype = "auto",
                      stored: torch.dtype | None = None) -> Placement:
    """``--compute-device`` and ``--dtype`` (either may be ``auto``) for a model whose weights
    are stored in ``stored``."""
    device = parse_device(compute_device)
    chosen = parse_dtype(dtype)
    if chosen is None:
        chosen = (stored or torch.float32) if device.type == "cuda" else torch.float32
    return Placement(device, chosen)


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's weights: where every stage computes for it."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def on_device_of(model: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """Token windows (or any input) on the model's device, so a caller's CPU windows work with a
    model on a GPU; a no-op when they are there already."""
    device = model_device(model)
    return tensor if tensor.device == device else tensor.to(device)
