"""Activation-aware scaling (AWQ, Lin et al. 2024), searched per layer.

Quantizing W·diag(s) and dividing the layer's input by s computes (Q(W·diag(s))·diag(1/s)) x:
columns with s_j > 1 get finer steps relative to their weights, at the cost of the other
columns in their groups. AWQ takes s_j = m_j^α from the input's magnitude m_j and searches α
in [0, 1) on a grid for the least output error. Here m_j is the root mean square of input
column j over the calibration tokens (AWQ uses the mean absolute value; the statistics here
keep E[x_j²]), s is normalised to geometric mean 1 of its extremes (AWQ's
``s / sqrt(max·min)``) and rounded to float16 as stored, and the error is the expected squared
output error tr(ΔW H ΔWᵀ) with H = E[x xᵀ] (its diagonal where only that was collected), ΔW
from RTN on the layer's grid (min/max, or clipped where the layer clips: a scale chosen for
the min/max grid and then clipped measured worse than clipping alone), as AWQ searches with its
plain quantizer before the real one runs. α = 0 gives s = 1, the layer without scaling: the
search never chooses worse than that. On a 1536 × 8960 layer most of the search's time is the
20 products ΔW·H (8960²), exact, as the statistics keep H rather than the tokens.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from ..errors import AutocompressError
from .quant import _squared_error, fake_quantize

ALPHA_GRID = 20  # α = 0, 0.05, ..., 0.95 (AWQ's n_grid)


def input_rms(stats) -> Tensor:
    """rms(x_j) per input column from a layer's calibration statistics (weights.LayerStats)."""
    mean_square = None if stats is None else stats.input_mean_square()
    if mean_square is None:
        raise AutocompressError("awq scales input columns by their calibration activations: "
                                "it needs calibration text (or leave awq out)")
    return mean_square.clamp_min(0).sqrt()


def scales_for(rms: Tensor, alpha: float) -> Tensor:
    """s = rms^α, normalised and rounded to float16 as the layer stores it."""
    s = rms.clamp_min(1e-8) ** alpha
    s = s / (s.max() * s.min()).sqrt()
    return s.half().float().clamp_min(torch.finfo(torch.float16).tiny)


def output_error(delta: Tensor, stats) -> float:
    """E‖ΔW x‖² through H, or through its diagonal where only that was kept."""
    if stats.H is not None:
        return _squared_error(delta, stats.H.float(), None, None)
    return _squared_error(delta, None, stats.input_mean_square(), None)


def search_input_scale(w: Tensor, stats, bits: int, group_size: int, sym: bool,
                       clip: bool = False, grid: int = ALPHA_GRID) -> tuple[Tensor, float]:
    """(s, α) with the least expected output error of RTN on W·diag(s), input divided by s;
    ``clip``: of RTN on the clipped grid (its importance the scaled input's mean square), so
    that the scale is chosen for the grid the layer will have."""
    rms = input_rms(stats)
    best = None
    for k in range(grid):
        alpha = k / grid
        s = scales_for(rms, alpha)
        decoded = fake_quantize(w * s, bits, group_size, sym, clip=clip,
                                importance=(rms / s) ** 2 if clip else None) / s
        error = output_error(decoded - w, stats)
        if best is None or error < best[0]:
            best = (error, s, alpha)
    return best[1], best[2]


def scaled_stats(stats, s: Tensor):
    """The statistics of x / s given those of x (the scaled weight's input)."""
    inv = 1.0 / s
    return replace(stats,
                   H=None if stats.H is None else stats.H * inv[:, None] * inv[None, :],
                   act_norm=None if stats.act_norm is None else stats.act_norm * inv,
                   mean_square=None if stats.mean_square is None else stats.mean_square * inv ** 2)
