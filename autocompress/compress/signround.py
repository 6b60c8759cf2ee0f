"""Learned rounding (SignRound, the method AutoRound implements): per decoder block, each
quantized weight's rounding offsets and grid range tuned by signed gradient descent so that the
block's output matches the uncompressed block's on calibration windows.

Per group the grid is RTN's with its range shrunk by learned factors (asymmetric: one for the
minimum, one for the maximum; symmetric: one for max|w|), each in [0.5, 1], and every weight
gets a learned offset v in [-0.5, 0.5] before rounding:

    scale = (b·max − a·min) / qmax,  zero = round(−a·min / scale)
    q = clamp(round(w / scale + v) + zero, 0, qmax),  w' = (q − zero) · scale

Rounding passes gradients straight through. Each step takes one calibration window; every
``eval_every`` steps (and before the first) the loss over all windows decides which state is
kept, so the result is never worse on the calibration windows than the RTN grid it starts from.
The stored format is RTN's (codes, per-group scale and zero): it packs, exports and loads like
any RTN or GPTQ layer. An AWQ layer (``awq: true``) keeps its format too: its input scale s is
searched first as for RTN (awq.py), the grid is learned on W·diag(s), and the layer's weight is
the decoded grid divided by s, as the stored layer computes it. Inputs are the block's inputs
through the already-compressed prefix, and the target is the uncompressed block's output on
those same inputs (GPTQ's sequential objective, taken at the block's output instead of each
layer's).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .quant import QuantizedWeight, _grouped, _params_from_range, expand_groups

RANGE_FLOOR = 0.5  # the grid's range never shrinks below half of min/max (AutoRound's bound)


@dataclass(frozen=True)
class SignRoundSettings:
    """Part of what ``method: signround`` means: a plan built with other values would hold
    other weights, so these are fixed, not options."""

    steps: int = 200
    lr: float = 1 / 200  # AutoRound's 1/steps, decayed linearly to 0
    eval_every: int = 25
    seed: int = 0


def _round_ste(x: Tensor) -> Tensor:
    return x + (torch.round(x) - x).detach()


class LearnedGrid(nn.Module):
    """One weight's tunable rounding: offsets [out, in] and range factors [out, n_groups].
    ``input_scale`` (AWQ's s, [in]): the grid is of W·diag(s), and the layer divides its input
    by s."""

    def __init__(self, weight: Tensor, bits: int, group_size: int, sym: bool,
                 input_scale: Tensor | None = None):
        super().__init__()
        self.dtype = weight.dtype  # what the block computes in; the grid works in float32
        self.input_scale = None if input_scale is None else input_scale.detach().float()
        scaled = weight.detach().float()
        if self.input_scale is not None:
            scaled = scaled * self.input_scale
        self.register_buffer("weight", scaled)
        self.bits, self.group_size, self.sym = bits, group_size, sym
        grouped = _grouped(self.weight, group_size)
        self.register_buffer("wmin", grouped.amin(dim=2))
        self.register_buffer("wmax", grouped.amax(dim=2))
        self.offset = nn.Parameter(torch.zeros_like(self.weight))
        self.shrink_min = nn.Parameter(torch.ones_like(self.wmin))
        self.shrink_max = nn.Parameter(torch.ones_like(self.wmax))

    def grid(self) -> tuple[Tensor, Tensor]:
        """(scale, zero) per group, [out, n_groups]: RTN's grid of the shrunk range, its zero
        rounded straight-through so that the range factors learn through it too."""
        lo, hi = self.shrink_min * self.wmin, self.shrink_max * self.wmax
        scale, zero = _params_from_range(lo, hi, self.bits, self.sym)
        return scale, zero if self.sym else _round_ste(-lo / scale)

    def _codes(self, differentiable: bool) -> tuple[Tensor, Tensor, Tensor]:
        scale, zero = self.grid()
        in_features = self.weight.shape[1]
        s = expand_groups(scale, self.group_size, in_features)
        z = expand_groups(zero, self.group_size, in_features)
        rounded = _round_ste if differentiable else torch.round
        q = torch.clamp(rounded(self.weight / s + self.offset) + z, 0, 2 ** self.bits - 1)
        return q, s, z

    def forward(self) -> Tensor:
        """The layer's dequantized weight, differentiable in the offsets and range factors."""
        q, s, z = self._codes(differentiable=True)
        decoded = (q - z) * s
        return decoded if self.input_scale is None else decoded / self.input_scale

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """Signed gradient descent, then each parameter back inside its bounds."""
        for param, low, high in ((self.offset, -0.5, 0.5),
                                 (self.shrink_min, RANGE_FLOOR, 1.0),
                                 (self.shrink_max, RANGE_FLOOR, 1.0)):
            if param.grad is not None:
                param -= lr * param.grad.sign()
                param.clamp_(low, high)
                param.grad = None

    @torch.no_grad()
    def quantized(self) -> QuantizedWeight:
        q, _, _ = self._codes(differentiable=False)
        scale, zero = self.grid()
        return QuantizedWeight(q.to(torch.uint8), scale.detach().clone(), zero.detach().clone(),
                               self.bits, self.group_size, self.sym,
                               input_scale=self.input_scale)

    def state(self) -> list[Tensor]:
        return [p.detach().clone() for p in (self.offset, self.shrink_min, self.shrink_max)]

    @torch.no_grad()
    def load(self, state: list[Tensor]) -> None:
        for param, value in zip((self.offset, self.shrink_min, self.shrink_max), state):
            param.copy_(value)


def _output(out) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


class SignRound:
    """Learned rounding of some weights of one block (``grids``: their names inside the block
    -> LearnedGrid); the block's other weights stay as they are (already compressed, or float).

    ``tune(inputs, kwargs, targets)`` then ``quantized()``, as GPTQ's class is used."""

    def __init__(self, block: nn.Module, grids: dict[str, LearnedGrid],
                 settings: SignRoundSettings = SignRoundSettings()):
        self.block = block
        self.grids = grids
        self.settings = settings
        self.losses: list[tuple[int, float]] = []  # (step, loss over all windows)

    def _forward(self, hidden: Tensor, kwargs: dict) -> Tensor:
        weights = {f"{name}.weight": grid().to(grid.dtype) for name, grid in self.grids.items()}
        return _output(functional_call(self.block, weights, (hidden,), kwargs))

    def loss(self, inputs: list[Tensor], kwargs: list[dict], targets: list[Tensor]) -> float:
        """Mean squared error of the block's output over all windows, the grids as they are."""
        with torch.no_grad():
            total = sum(float(torch.nn.functional.mse_loss(self._forward(h, kw).float(), t.float()))
                        for h, kw, t in zip(inputs, kwargs, targets))
        return total / len(inputs)

    def tune(self, inputs: list[Tensor], kwargs: list[dict], targets: list[Tensor]) -> float:
        """Tune every grid; returns the kept state's loss over all windows."""
        settings = self.settings
        generator = torch.Generator().manual_seed(settings.seed)
        frozen = [(p, p.requires_grad) for p in self.block.parameters()]
        # inputs captured under no_grad/inference mode are plain tensors again here; the
        # block's own weights take no gradient (only the grids learn)
        with torch.inference_mode(False), torch.enable_grad(), _frozen(frozen):
            inputs = [h.clone() for h in inputs]
            targets = [t.clone() for t in targets]
            kwargs = [{k: _plain(v) for k, v in kw.items()} for kw in kwargs]
            best = self.loss(inputs, kwargs, targets)
            self.losses.append((0, best))
            best_state = {name: grid.state() for name, grid in self.grids.items()}
            for step in range(1, settings.steps + 1):
                i = int(torch.randint(len(inputs), (1,), generator=generator))
                out = self._forward(inputs[i], kwargs[i])
                torch.nn.functional.mse_loss(out.float(), targets[i].float()).backward()
                lr = settings.lr * (1 - (step - 1) / settings.steps)
                for grid in self.grids.values():
                    grid.step(lr)
                if step % settings.eval_every == 0 or step == settings.steps:
                    current = self.loss(inputs, kwargs, targets)
                    self.losses.append((step, current))
                    if current < best:
                        best = current
                        best_state = {name: grid.state() for name, grid in self.grids.items()}
            for name, grid in self.grids.items():
                grid.load(best_state[name])
        return best

    def quantized(self) -> dict[str, QuantizedWeight]:
        return {name: grid.quantized() for name, grid in self.grids.items()}


@contextmanager
def _frozen(params: list[tuple[nn.Parameter, bool]]):
    for param, _ in params:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in params:
            param.requires_grad_(flag)


def _plain(value):
    """A copy of a block keyword argument outside inference mode (tensors, tuples of them)."""
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value
