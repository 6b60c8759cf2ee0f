"""Empirical Fisher diagonal of the LM loss with respect to each layer's weight.

F_ij = E_w[(∂L_w / ∂W_ij)²] over calibration windows w (L_w: mean next-token loss of the T
predicted tokens of window w). The Fisher of the *summed* loss of a window approximates its
Hessian, and L_w is that sum over T, so the increase of the mean loss (nats per token, the unit
of measured KL) for a perturbation ΔW is, to second order,

    ΔL ≈ ½ T Σ F ⊙ ΔW²,

additive over layers.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..compress.calibration import InputStats
from ..compress.quant import quant_error_many
from ..model import LayerInfo, LoadedModel
from ..placement import on_device_of
from .base import SensitivityProxy, register


def fisher_diagonal(model: nn.Module, layers: list[LayerInfo], windows: torch.Tensor,
                    progress: bool = True) -> dict[str, torch.Tensor]:
    """Mean squared gradient of each layer's weight over ``windows`` [n, L] (one sample per
    window). Only the listed layers' weights take gradients; the model is left unchanged."""
    params = {layer.name: model.get_submodule(layer.name).weight for layer in layers}
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}

    windows = on_device_of(model, windows)
    with gradients_for(model, params.values()):
        for p in params.values():
            p.grad = None  # a gradient left from elsewhere would be counted in the first sum
        # each gradient is squared into its sum and dropped as soon as backward has it: one
        # layer's gradient alive at a time, not the whole model's
        handles = [p.register_post_accumulate_grad_hook(_squared_into(sums[name]))
                   for name, p in params.items()]
        try:
            for i in tqdm(range(windows.shape[0]), desc="fisher", disable=not progress,
                          leave=False):
                window = windows[i:i + 1]
                model(window, labels=window, use_cache=False).loss.backward()
        finally:
            for handle in handles:
                handle.remove()
    n = windows.shape[0]
    for total in sums.values():
        total.div_(n)
    return sums


OnBlock = Callable[[int, dict[str, torch.Tensor], dict[str, InputStats]], None]


def fisher_by_block(model: nn.Module, layers: list[LayerInfo], windows: torch.Tensor,
                    on_block: OnBlock, progress: bool = True,
                    hessian_layers: set[str] | None = None) -> None:
    """``fisher_diagonal`` one block at a time, last block first: ``on_block(index, sums,
    stats)`` receives each block's layers' Fisher diagonals, complete over all windows, and
    the input statistics of those layers (``collect_stats``'s, taken in the same pass), and
    nothing of them is kept after it returns.

    The whole model's backward holds every block's activations, and its Fisher every weight's
    squared gradient, until the last window is done (2.5 GB and 5 GB on a 1.5B model). Here a
    forward pass without gradients writes each block's input, for every window, to a
    temporary directory; the loss's gradient at the last block's output is taken through the
    final norm and head; then each block, from the last, is run again on its saved inputs with
    gradients and given the gradient of its output, which yields its weights' gradients and the
    gradient of its input: the next block down's output gradient. The sums are those of the
    whole model's backward (tested); memory holds one block's activations and Fisher."""
    from ..compress.calibration import BlockRunner, _block_output, _hook_layers, _stats_by_layer
    from ..residency import release_module

    by_block: dict[int, list[LayerInfo]] = {}
    for layer in layers:
        by_block.setdefault(layer.block, []).append(layer)
    if not by_block:
        return
    windows = on_device_of(model, windows)
    runner = BlockRunner(model, windows)
    blocks = runner.blocks
    lowest = min(by_block)
    bar = tqdm(total=2 * len(blocks) - lowest, desc="fisher", disable=not progress, leave=False)
    with tempfile.TemporaryDirectory(prefix="autocompress-fisher-") as tmp:
        inputs = Path(tmp)
        with torch.no_grad():
            for index in range(len(blocks)):
                if index >= lowest:
                    torch.save(runner.hidden, inputs / f"{index}.pt")
                runner.advance(index)
                release_module(blocks[index])  # read in again when it is run backward
                bar.update()
        release_module(model.get_input_embeddings())  # its rows were read once, above
        grads = [_head_gradient(model, hidden, window)
                 for hidden, window in zip(runner.hidden, windows)]
        runner.hidden = []
        # the head (a 1.5B model's untied one is 0.9 GB in float32) is done with too
        release_module(model.get_output_embeddings())
        for index in reversed(range(lowest, len(blocks))):
            block_layers = by_block.get(index, [])
            hidden = torch.load(inputs / f"{index}.pt")
            (inputs / f"{index}.pt").unlink()
            params = {layer.name: model.get_submodule(layer.name).weight
                      for layer in block_layers}
            sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
            accumulators: dict = {}
            hooks = _hook_layers(model, block_layers, accumulators, hessian_layers)
            with gradients_for(model, params.values()):
                for p in params.values():
                    p.grad = None
                handles = [p.register_post_accumulate_grad_hook(_squared_into(sums[name]))
                           for name, p in params.items()]
                try:
                    for w, (h, kwargs) in enumerate(zip(hidden, runner.kwargs)):
                        h = h.detach().requires_grad_(True)
                        out = _block_output(blocks[index](h, **kwargs))
                        out.backward(grads[w])
                        grads[w] = h.grad
                finally:
                    for handle in handles + hooks:
                        handle.remove()
            del hidden
            for total in sums.values():
                total.div_(windows.shape[0])
            stats = _stats_by_layer(block_layers, accumulators) if block_layers else {}
            # the float64 running sums go before the rows are built: a 1.5B model's ffn_down
            # input holds 640 MB of them, beside its float32 statistics and GPTQ's factors
            accumulators.clear()
            on_block(index, sums, stats)
            del sums, stats
            release_module(blocks[index])
            bar.update()
    bar.close()


def _squared_into(total: torch.Tensor):
    def hook(param: torch.Tensor) -> None:
        total.add_(param.grad.float().square())
        param.grad = None
    return hook


def _head_gradient(model: nn.Module, hidden: torch.Tensor, window: torch.Tensor
                   ) -> torch.Tensor:
    """∂L/∂h of one window's mean next-token loss at the last block's output ``hidden``:
    the model's own final norm, head and loss function, as its forward computes them."""
    h = hidden.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model.lm_head(model.model.norm(h))
        loss = model.loss_function(logits=logits, labels=window.unsqueeze(0),
                                   vocab_size=model.config.vocab_size)
        (grad,) = torch.autograd.grad(loss, h)
    return grad


class gradients_for:
    """Context manager: only ``params`` require grad inside; every flag is restored after."""

    def __init__(self, model: nn.Module, params):
        self.model, self.params = model, list(params)

    def __enter__(self):
        self.previous = {name: p.requires_grad for name, p in self.model.named_parameters()}
        self.model.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        return self

    def __exit__(self, *exc):
        for name, p in self.model.named_parameters():
            p.requires_grad_(self.previous[name])
        return False


@register
class FisherProxy(SensitivityProxy):
    """cost(ΔW) = ½ Σ F ⊙ ΔW² with F the empirical Fisher diagonal of the layer's weight."""

    name = "fisher"
    uses_gradients = True

    def prepare(self, loaded: LoadedModel, windows: torch.Tensor, layers: list[LayerInfo],
                progress: bool = True) -> None:
        self.fisher = fisher_diagonal(loaded.model, layers, windows, progress=progress)
        self.tokens = windows.shape[1] - 1  # T: each window's loss is a mean over T tokens

    blockwise = True

    def prepare_blocks(self, loaded: LoadedModel, windows: torch.Tensor,
                       layers: list[LayerInfo], on_block, hessian_layers: set[str],
                       progress: bool = True) -> None:
        """``fisher_by_block``: the Fisher diagonal of one block's layers at a time."""
        self.tokens = windows.shape[1] - 1
        names = {layer.name: layer for layer in layers}

        def ready(_index: int, sums: dict[str, torch.Tensor], stats: dict) -> None:
            self.fisher = sums
            try:
                on_block([names[name] for name in sums], stats)
            finally:
                self.fisher = {}

        fisher_by_block(loaded.model, layers, windows, ready, progress=progress,
                        hessian_layers=hessian_layers)

    def layer_costs(self, layer: LayerInfo, weight: torch.Tensor,
                    deltas: list[torch.Tensor]) -> list[float]:
        f = self.fisher[layer.name]
        return [0.5 * self.tokens * float((f * d.square()).sum()) for d in deltas]

    def rtn_costs(self, layer: LayerInfo, weight: torch.Tensor,
                  options: list[tuple[int, int, bool]]) -> list[float]:
        errors = quant_error_many(weight, options, weights=self.fisher[layer.name])
        return [0.5 * self.tokens * float(e) for e in errors]

    def describe(self) -> dict:
        return {"proxy": self.name, "version": 2}  # 2: costs scaled by T
