"""Calibration statistics of each linear layer's input: H = E[x xᵀ] and ‖X_j‖₂.

Layers that read the same tensor (q/k/v read the attention norm's output, gate/up the MLP
norm's) share one accumulator, so H is computed once per distinct input.

Two ways to run the model:
- ``collect_stats``: one pass of the unchanged model (all layers see uncompressed inputs);
- ``BlockRunner``: block by block, as GPTQ's reference implementation does, so that each block's
  statistics can be taken *through the already-compressed prefix* (sequential mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..model import LayerInfo
from ..placement import model_device, on_device_of

# Which layers read the same input tensor inside a Llama block.
_INPUT_GROUP = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o_in",
                "gate": "mlp_in", "up": "mlp_in", "down": "down_in"}


def input_group(layer: LayerInfo) -> tuple[Any, str]:
    return (layer.block, _INPUT_GROUP.get(layer.kind, layer.name))


_ROWS_PER_ADD = 1024


class InputAccumulator:
    """Running sums for one input: Σ x xᵀ and the token count, or only Σ x² per column where
    nothing needs the off-diagonal (llama.cpp's imatrix, Wanda): the full matrix of a
    1.5B model's ffn_down inputs is 8960² float64, 640 MB a block, and its product per batch
    most of the calibration's time. Each batch's product is taken in float32 (a few hundred
    terms: fast, and accurate enough), the running sum in float64."""

    def __init__(self, dim: int, full: bool = True, device: torch.device | str = "cpu"):
        self.full = full
        self.xtx = torch.zeros(dim, dim, dtype=torch.float64, device=device) if full else None
        self.sq = None if full else torch.zeros(dim, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.full:
            # added in slices of rows: adding a float32 tensor to a float64 one makes a float64
            # copy of it first (640 MB at a 1.5B model's ffn_down); a slice's copy is small, and
            # the sums are the same
            product = x.T @ x
            for start in range(0, product.shape[0], _ROWS_PER_ADD):
                self.xtx[start:start + _ROWS_PER_ADD] += product[start:start + _ROWS_PER_ADD]
        else:
            self.sq += (x * x).sum(0).double()
        self.n += x.shape[0]

    def _diagonal(self) -> torch.Tensor:
        return self.xtx.diagonal() if self.full else self.sq

    def finish(self) -> "InputStats":
        """The statistics (H = E[x xᵀ] in float32, GPTQ's up to its factor 2; None when only the
        diagonal is kept), the running sums released: H is divided in place (no float64
        temporary beside the sum), so the accumulator takes no more inputs."""
        act_norm, mean_square = self.act_norm, self.mean_square
        hessian = self.xtx.div_(max(self.n, 1)).float() if self.full else None
        self.xtx = self.sq = None
        return InputStats(hessian, act_norm, self.n, mean_square)

    @property
    def mean_square(self) -> torch.Tensor:
        """E[x_j²] per input column (llama.cpp's importance matrix), float32."""
        return (self._diagonal() / max(self.n, 1)).float()

    @property
    def act_norm(self) -> torch.Tensor:
        """‖X_j‖₂ over all calibration tokens (Wanda's activation norm)."""
        return self._diagonal().clamp_min(0).sqrt().float()


@dataclass
class InputStats:
    hessian: torch.Tensor | None  # [in, in] E[x xᵀ]; None where only the diagonal was kept
    act_norm: torch.Tensor  # [in]
    n_samples: int
    mean_square: torch.Tensor | None = None  # [in] E[x_j²]


def _hook_layers(model: nn.Module, layers: Iterable[LayerInfo],
                 accumulators: dict[tuple, InputAccumulator],
                 hessian_layers: set[str] | None = None) -> list:
    """One forward pre-hook per distinct input; its accumulator keeps the full E[x xᵀ] when
    any layer reading that input is in ``hessian_layers`` (None: every layer)."""
    layers = list(layers)
    full = {input_group(layer) for layer in layers
            if hessian_layers is None or layer.name in hessian_layers}
    handles = []
    seen: set[tuple] = set()
    device = model_device(model)
    for layer in layers:
        group = input_group(layer)
        if group in seen:
            continue
        seen.add(group)
        acc = accumulators.setdefault(group, InputAccumulator(layer.in_features,
                                                              full=group in full, device=device))

        def hook(_module, args, acc=acc):
            acc.add(args[0])

        handles.append(model.get_submodule(layer.name).register_forward_pre_hook(hook))
    return handles


def _stats_by_layer(layers: Iterable[LayerInfo], accumulators: dict[tuple, InputAccumulator]
                    ) -> dict[str, InputStats]:
    out: dict[str, InputStats] = {}
    cache: dict[tuple, InputStats] = {}
    for layer in layers:
        group = input_group(layer)
        if group not in cache:
            cache[group] = accumulators[group].finish()  # the float64 sums go here
        out[layer.name] = cache[group]  # shared object: q/k/v hold the same H
    return out


@torch.no_grad()
def collect_stats(model: nn.Module, layers: list[LayerInfo], windows: torch.Tensor,
                  progress: bool = True, hessian_layers: set[str] | None = None
                  ) -> dict[str, InputStats]:
    """Input statistics of every layer in ``layers`` from one pass of ``model`` over windows;
    the full E[x xᵀ] only for the inputs of ``hessian_layers`` (None: all)."""
    accumulators: dict[tuple, InputAccumulator] = {}
    handles = _hook_layers(model, layers, accumulators, hessian_layers)
    windows = on_device_of(model, windows)
    try:
        for i in tqdm(range(windows.shape[0]), desc="calibration", disable=not progress, leave=False):
            model(windows[i:i + 1], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return _stats_by_layer(layers, accumulators)


class _StopForward(Exception):
    pass


class BlockRunner:
    """Runs a Llama-style model one decoder block at a time over calibration windows.

    The inputs of block 0 (hidden states and the keyword arguments the model passes every
    block: rotary embeddings, mask, positions) are captured once; ``run_block`` then pushes the
    hidden states through one block, so compressing block b before running it makes every
    later block see the compressed prefix.
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor):
        self.model = model
        self.blocks = model.model.layers
        self.hidden: list[torch.Tensor] = []
        self.kwargs: list[dict] = []
        self._capture(windows)

    @torch.no_grad()
    def _capture(self, windows: torch.Tensor) -> None:
        def grab(_module, args, kwargs):
            self.hidden.append(args[0].detach())
            self.kwargs.append({k: v for k, v in kwargs.items() if k != "past_key_values"})
            raise _StopForward

        handle = self.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
        windows = on_device_of(self.model, windows)
        try:
            for i in range(windows.shape[0]):
                try:
                    self.model(windows[i:i + 1], use_cache=False)
                except _StopForward:
                    pass
        finally:
            handle.remove()

    @torch.no_grad()
    def run_block(self, index: int, layers: list[LayerInfo] | None = None,
                  hessian_layers: set[str] | None = None) -> dict[str, InputStats] | None:
        """Input stats of ``layers`` (all inside block ``index``) with the block as it is now.
        Does not advance the hidden states: call ``advance`` after compressing the block."""
        if not layers:
            return None
        accumulators: dict[tuple, InputAccumulator] = {}
        handles = _hook_layers(self.model, layers, accumulators, hessian_layers)
        try:
            for hidden, kwargs in zip(self.hidden, self.kwargs):
                self.blocks[index](hidden, **kwargs)
        finally:
            for h in handles:
                h.remove()
        return _stats_by_layer(layers, accumulators)

    @torch.no_grad()
    def outputs(self, index: int) -> list[torch.Tensor]:
        """Block ``index``'s outputs on the current hidden states, its weights as they are now
        (the targets of a block-wise objective, taken before the block is compressed)."""
        return [_block_output(self.blocks[index](h, **kw))
                for h, kw in zip(self.hidden, self.kwargs)]

    @torch.no_grad()
    def advance(self, index: int) -> None:
        """Replace the hidden states by block ``index``'s outputs (its current weights)."""
        self.hidden = self.outputs(index)


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def sequential(model: nn.Module, layers: list[LayerInfo], windows: torch.Tensor,
               compress_block: Callable[[int, dict[str, InputStats], BlockRunner], None],
               progress: bool = True, hessian_layers: set[str] | None = None) -> None:
    """For each block in order: take its layers' input stats through the already-compressed
    prefix, let ``compress_block(block, stats, runner)`` install the compressed weights (the
    runner holds the block's inputs, for block-wise objectives), then advance."""
    runner = BlockRunner(model, windows)
    by_block: dict[int, list[LayerInfo]] = {}
    for layer in layers:
        by_block.setdefault(layer.block, []).append(layer)
    for index in tqdm(range(len(runner.blocks)), desc="sequential", disable=not progress,
                      leave=False):
        block_layers = by_block.get(index, [])
        if block_layers:
            stats = runner.run_block(index, block_layers, hessian_layers)
            compress_block(index, stats, runner)
        runner.advance(index)
