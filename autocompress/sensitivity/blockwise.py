"""The loss's backward one decoder block at a time (sequential onloading), for the proxies
that need gradients: the squared gradients of each block's layers, complete over all
windows, with the layers' input statistics taken in the same pass.

The whole model's backward holds every block's activations, and a Fisher every weight's
squared gradient, until the last window is done (2.5 GB and 5 GB on a 1.5B model). Here a
forward pass without gradients writes each block's input, for every window, to a temporary
directory; the loss's gradient at the last block's output is taken through the final norm
and head; then each block, from the last, is run again on its saved inputs with gradients and
given the gradient of its output, which yields what is gathered of its layers and the gradient
of its input: the next block down's output gradient. The sums are those of the whole model's
backward (tested); memory holds one block's activations and sums.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ..compress.calibration import InputStats
from ..model import LayerInfo
from ..placement import on_device_of

OnBlock = Callable[[int, dict[str, torch.Tensor], dict[str, InputStats]], None]
#: what is summed per layer: "weights", Σ (∂L_w/∂W)² per weight (the Fisher diagonal);
#: "outputs", Σ_t (∂L_w/∂y_t)² per output channel (the Hessian proxy's channel weights)
Gathered = Literal["weights", "outputs"]


def gradient_squares_by_block(model: nn.Module, layers: list[LayerInfo], windows: torch.Tensor,
                              on_block: OnBlock, gather: Gathered = "weights",
                              progress: bool = True, hessian_layers: set[str] | None = None,
                              desc: str = "fisher") -> None:
    """Last block first, ``on_block(index, sums, stats)`` receives the mean over ``windows``
    of each of the block's layers' squared gradients (``gather``) and the input statistics of
    those layers (``collect_stats``'s; the full E[x xᵀ] for ``hessian_layers``, None: all);
    nothing of them is kept after it returns."""
    from ..compress.calibration import BlockRunner, _block_output, _hook_layers, _stats_by_layer
    from ..residency import release_module
    from .fisher import gradients_for

    by_block: dict[int, list[LayerInfo]] = {}
    for layer in layers:
        by_block.setdefault(layer.block, []).append(layer)
    if not by_block:
        return
    windows = on_device_of(model, windows)
    runner = BlockRunner(model, windows)
    blocks = runner.blocks
    lowest = min(by_block)
    bar = tqdm(total=2 * len(blocks) - lowest, desc=desc, disable=not progress, leave=False)
    with tempfile.TemporaryDirectory(prefix="autocompress-backward-") as tmp:
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
            modules = {layer.name: model.get_submodule(layer.name) for layer in block_layers}
            accumulators: dict = {}
            hooks = _hook_layers(model, block_layers, accumulators, hessian_layers)
            params, sums, hook_squares = _gathering(gather, modules)
            with gradients_for(model, params):
                for p in params:
                    p.grad = None  # a gradient left from elsewhere would be counted
                handles = hook_squares()
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


def _gathering(gather: Gathered, modules: dict[str, nn.Module]):
    """What ``gather`` takes of a block's layers: the parameters that must take gradients,
    the zeroed sums, and a function that hooks the squares into them and returns the handles
    (called once the parameters take gradients: a weight's hook needs that)."""
    if gather == "weights":
        # each gradient is squared into its sum and dropped as soon as backward has it: one
        # layer's gradient alive at a time
        sums = {name: torch.zeros_like(m.weight, dtype=torch.float32)
                for name, m in modules.items()}
        return [m.weight for m in modules.values()], sums, lambda: [
            m.weight.register_post_accumulate_grad_hook(squared_into(sums[name]))
            for name, m in modules.items()]
    # no parameter takes gradients: the block's input does, so its layers' outputs get them
    sums = {name: torch.zeros(m.weight.shape[0], device=m.weight.device)
            for name, m in modules.items()}
    return [], sums, lambda: [m.register_full_backward_hook(output_squares_into(sums[name]))
                              for name, m in modules.items()]


def squared_into(total: torch.Tensor):
    """A post-accumulate-grad hook: adds the parameter's squared gradient to ``total`` and
    drops the gradient."""
    def hook(param: torch.Tensor) -> None:
        total.add_(param.grad.float().square())
        param.grad = None
    return hook


def output_squares_into(total: torch.Tensor):
    """A full backward hook: adds Σ_t (∂L/∂y_t)² per output channel to ``total``."""
    def hook(_module, _grad_input, grad_output) -> None:
        g = grad_output[0].detach().float()
        total.add_(g.reshape(-1, g.shape[-1]).square().sum(dim=0))
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
