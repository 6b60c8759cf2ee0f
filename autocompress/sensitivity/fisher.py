"""Empirical Fisher diagonal of the LM loss with respect to each layer's weight.

F_ij = E_w[(∂L_w / ∂W_ij)²] over calibration windows w (L_w: mean next-token loss of the T
predicted tokens of window w). The Fisher of the *summed* loss of a window approximates its
Hessian, and L_w is that sum over T, so the increase of the mean loss (nats per token, the unit
of measured KL) for a perturbation ΔW is, to second order,

    ΔL ≈ ½ T Σ F ⊙ ΔW²,

additive over layers.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..compress.quant import quant_error_many
from ..model import LayerInfo, LoadedModel
from ..placement import on_device_of
from .base import SensitivityProxy, register
from .blockwise import OnBlock, gradient_squares_by_block, squared_into


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
        handles = [p.register_post_accumulate_grad_hook(squared_into(sums[name]))
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


def fisher_by_block(model: nn.Module, layers: list[LayerInfo], windows: torch.Tensor,
                    on_block: OnBlock, progress: bool = True,
                    hessian_layers: set[str] | None = None) -> None:
    """``fisher_diagonal`` one block at a time, last block first (blockwise.py's backward):
    ``on_block(index, sums, stats)`` receives each block's layers' Fisher diagonals, complete
    over all windows, and the input statistics of those layers (``collect_stats``'s, taken in
    the same pass), and nothing of them is kept after it returns."""
    gradient_squares_by_block(model, layers, windows, on_block, "weights", progress=progress,
                              hessian_layers=hessian_layers, desc="fisher")


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
