"""HAWQ-v2-style proxy: the trace of each layer's loss Hessian, by Hutchinson's estimator.

For a Rademacher vector v (entries ±1), E[vᵀ H v] = tr(H). One Hessian-vector product per probe
(double backpropagation) gives vₗᵀ (Hv)ₗ for every layer l at once, an unbiased estimate of the
trace of that layer's diagonal block. The cost of a perturbation is then the average curvature
times its energy (Dong et al. 2020):

    ΔL ≈ ½ · tr(Hₗ) / nₗ · ‖ΔW‖².
"""

from __future__ import annotations

import warnings

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from ..compress.quant import quant_error_many
from ..model import LayerInfo, LoadedModel
from ..placement import model_device, on_device_of
from .base import SensitivityProxy, register
from .fisher import gradients_for


def hutchinson_traces(loaded: LoadedModel, layers: list[LayerInfo], windows: torch.Tensor,
                      probes: int = 1, seed: int = 0, progress: bool = True) -> dict[str, float]:
    """tr(Hₗ) per layer, averaged over windows × probes Rademacher vectors.

    Each probe is one double backward through the whole model, kept lean: the first-order
    gradients gₗ (their graph kept) are turned into gₗ·vₗ as backward delivers them and
    dropped, and the second backward's Hessian-vector products into vₗ·(Hv)ₗ the same way,
    the signs of v held as booleans. Returning them all at once, as ``autograd.grad`` does,
    held three float copies of the layers' weights (gradients, probes, products: 15 GB on a
    1.5B model) beside the double backward's graph."""
    model = loaded.model
    params = [model.get_submodule(layer.name).weight for layer in layers]
    sums = [0.0] * len(layers)
    device = model_device(model)
    windows = on_device_of(model, windows)
    # the probes' signs are drawn on the CPU (as int8) and sent to the model's device: the same
    # seed gives the same probes (and traces, up to rounding) on every device
    generator = torch.Generator().manual_seed(seed)
    signs: list[torch.Tensor] = []
    first_order: list[torch.Tensor] = []  # gₗ·vₗ of this probe, one scalar per layer

    def delivered(k: int):
        def hook(p: torch.Tensor) -> None:
            g, p.grad = p.grad, None
            v_dot = torch.where(signs[k], g, -g).sum()
            if g.requires_grad:  # the first backward: gₗ, with its graph
                first_order.append(v_dot)
            else:  # the second: (Hv)ₗ
                sums[k] += float(v_dot)
        return hook

    # double backward needs SDPA's math backend: the fused kernels (flash attention on CPU,
    # flash / memory-efficient on CUDA) have no derivative of their backward
    with gradients_for(model, params), sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings():
        # backward(create_graph=True) warns of a parameter-gradient reference cycle: the
        # hooks take every gradient off its parameter as it arrives, so there is none
        warnings.filterwarnings("ignore", message=".*create_graph=True.*reference cycle")
        for p in params:
            p.grad = None
        handles = [p.register_post_accumulate_grad_hook(delivered(k))
                   for k, p in enumerate(params)]
        try:
            steps = [(i, p) for i in range(windows.shape[0]) for p in range(probes)]
            for i, _ in tqdm(steps, desc="hutchinson", disable=not progress, leave=False):
                signs[:] = [torch.randint(0, 2, p.shape, generator=generator, dtype=torch.int8)
                            .to(device) == 1 for p in params]
                window = windows[i:i + 1]
                model(window, labels=window, use_cache=False).loss.backward(create_graph=True)
                total, first_order[:] = torch.stack(first_order).sum(), []
                total.backward()
                del total
        finally:
            for handle in handles:
                handle.remove()
            signs.clear()
            first_order.clear()
    n = len(steps)
    return {layer.name: s / n for layer, s in zip(layers, sums)}


@register
class HutchinsonProxy(SensitivityProxy):
    name = "hutchinson"
    uses_gradients = True

    def __init__(self, probes: int = 1):
        self.probes = probes

    def prepare(self, loaded: LoadedModel, windows: torch.Tensor, layers: list[LayerInfo],
                progress: bool = True) -> None:
        self.traces = hutchinson_traces(loaded, layers, windows, self.probes, progress=progress)

    def prepared_state(self) -> dict | None:
        return {"traces": self.traces}

    def restore_prepared(self, state: dict | None, layers: list[LayerInfo]) -> bool:
        traces = (state or {}).get("traces")
        if not isinstance(traces, dict) or any(
                not isinstance(traces.get(layer.name), (int, float)) for layer in layers):
            return False
        self.traces = {name: float(t) for name, t in traces.items()}
        return True

    def layer_costs(self, layer: LayerInfo, weight: torch.Tensor,
                    deltas: list[torch.Tensor]) -> list[float]:
        # a negative trace estimate (noise, or a saddle) would reward damage: floor it at 0
        curvature = max(self.traces[layer.name], 0.0) / weight.numel()
        return [0.5 * curvature * float(d.square().sum()) for d in deltas]

    def rtn_costs(self, layer: LayerInfo, weight: torch.Tensor,
                  options: list[tuple[int, int, bool]]) -> list[float]:
        curvature = max(self.traces[layer.name], 0.0) / weight.numel()
        return [0.5 * curvature * float(e) for e in quant_error_many(weight, options)]

    def describe(self) -> dict:
        return {"proxy": self.name, "probes": self.probes}
