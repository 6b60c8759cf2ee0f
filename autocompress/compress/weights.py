"""Compress one linear layer's weight as its LayerConfig says, in the fixed order
low rank -> prune -> quantize.

With low rank, W ≈ A·B and each factor is then pruned and quantized as a matrix of its own with
the statistics of its own input: B sees the layer input x (second moment H), A sees B'x, where B'
is B as compressed, whose second moment is B' H B'ᵀ. B is therefore compressed first.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..errors import AutocompressError
from ..gguf_types import type_for_row
from ..plan import LayerConfig
from .awq import scaled_stats, search_input_scale
from .gguf import GGUFWeight, imatrix_from_hessian, quantize_gguf
from .gptq import GPTQ
from .lowrank import low_rank_factors, rank_for
from .prune import magnitude_mask, prune, wanda_mask
from .quant import QuantizedWeight, quantize_rtn


@dataclass
class LayerStats:
    """Calibration statistics of a layer's input x over n_samples tokens."""

    H: Tensor | None  # [in, in], E[x xᵀ]
    act_norm: Tensor | None  # [in], ‖X_j‖₂ = sqrt(Σ_tokens x_j²)
    n_samples: int
    mean_square: Tensor | None = None  # [in], E[x_j²] (kept where H is not)

    def activation_norms(self) -> Tensor | None:
        """act_norm, or sqrt(n · diag H) when only H was collected."""
        if self.act_norm is not None:
            return self.act_norm
        if self.H is not None:
            return (self.H.diagonal().float() * self.n_samples).sqrt()
        return None

    def input_mean_square(self) -> Tensor | None:
        """E[x_j²] per input column: mean_square, or the diagonal of H where only H was kept."""
        if self.mean_square is not None:
            return self.mean_square.float()
        return None if self.H is None else self.H.diagonal().float()


@dataclass(frozen=True)
class GPTQSettings:
    """Knobs of GPTQ that are not part of a plan's format (they change how, not what, is stored)."""

    damp: float = 0.01  # λ = damp · mean(diag H)
    # quantize columns by descending diag(H), static groups (the storage format is unchanged):
    # 3-bit SmolLM2 perplexity 62.2 with it against 85.2 without (experiments/gptq_study.py)
    act_order: bool = True
    block_size: int = 128


@dataclass
class CompressedMatrix:
    factor: Tensor  # pruned and dequantized, float32
    mask: Tensor | None  # True = kept; None when not pruned
    quantized: QuantizedWeight | GGUFWeight | None  # None when kept in float16


@dataclass
class CompressedLayer:
    factors: list[Tensor]  # [W'] for a dense layer, [A', B'] for a low-rank one; float32
    masks: list[Tensor | None]
    quantized: list[QuantizedWeight | GGUFWeight | None]

    def weight(self) -> Tensor:
        """The effective dense weight [out, in] (A'·B' for a low-rank layer)."""
        if len(self.factors) == 1:
            return self.factors[0]
        return self.factors[0] @ self.factors[1]


def compress_weight(w: Tensor, cfg: LayerConfig, stats: LayerStats | None = None,
                    gptq: GPTQSettings = GPTQSettings(),
                    source: GGUFWeight | None = None) -> CompressedLayer:
    """Apply ``cfg`` to ``w`` [out, in]; ``stats`` (of the layer's input) is needed by GPTQ and
    Wanda, and whitens the low-rank factorisation when it holds H. ``source``: the GGUF bytes
    ``w`` was loaded from; a gguf config of their type keeps them (as llama-quantize copies a
    tensor already in its target type) instead of quantizing the decoded values again, as long
    as ``w`` is still exactly what they decode to."""
    w = w.detach().float()
    if source is not None and keeps_source(cfg, source, w.shape):
        decoded = source.dequantize().to(w.device)
        if torch.equal(decoded, w):
            return _layer([CompressedMatrix(decoded, None, source)])
    if not cfg.is_low_rank:
        return _layer([compress_matrix(w, cfg, stats, gptq)])
    _check_two_four_rank(w, cfg)
    A, B = low_rank_factors(w, cfg.rank_ratio, H=None if stats is None else stats.H)
    b = compress_matrix(B, cfg, stats, gptq)
    a = compress_matrix(A, cfg, _stats_after(b.factor, stats), gptq)
    return _layer([a, b])


def keeps_source(cfg: LayerConfig, source: GGUFWeight, shape) -> bool:
    """Whether ``cfg`` stores a matrix of ``shape`` in the type ``source`` already has."""
    return (cfg.is_gguf and tuple(shape) == source.shape
            and type_for_row(cfg.gguf, source.shape[1]) == source.type)


def compress_matrix(w: Tensor, cfg: LayerConfig, stats: LayerStats | None,
                    gptq: GPTQSettings = GPTQSettings()) -> CompressedMatrix:
    """Prune then quantize one matrix (float32 [out, in]) whose input has ``stats``."""
    if cfg.is_gguf:
        # llama.cpp's quantizers run on the CPU; the decoded weight goes back where w is
        gguf = quantize_gguf(w, cfg.gguf, _imatrix(cfg, stats))
        return CompressedMatrix(gguf.dequantize().to(w.device), None, gguf)
    mask = _prune_mask(w, cfg, stats) if cfg.is_pruned else None
    kept = w if mask is None else prune(w, mask)
    if cfg.bits == 16:
        return CompressedMatrix(kept.half().float(), mask, None)
    if cfg.method == "signround":
        raise AutocompressError("method signround is tuned per block on the block's inputs "
                                "(compress_layers_into, sequential calibration), not one "
                                "weight at a time")
    input_scale = None
    if cfg.awq:  # the weight's columns scaled up, its input down (awq.py); dense layers only
        input_scale, _ = search_input_scale(w, stats, cfg.bits, cfg.group_size, cfg.sym,
                                            clip=cfg.clip)
        w = kept = w * input_scale
        stats = scaled_stats(stats, input_scale)
    if cfg.method == "gptq":
        # GPTQ gets the unpruned weight and the mask: it zeroes the pruned weights itself and
        # compensates for them (SparseGPT), which pre-pruning would prevent
        quantized = _gptq(w, cfg, stats, mask, gptq)
    else:
        # the pruned zeros stay exactly 0: a group holding a 0 has 0 on its grid (code = zero)
        quantized = quantize_rtn(kept, cfg.bits, cfg.group_size, cfg.sym, clip=cfg.clip,
                                 importance=_input_mean_square(stats) if cfg.clip else None)
    if input_scale is not None:
        quantized = replace(quantized, input_scale=input_scale)
    return CompressedMatrix(quantized.dequantize(), mask, quantized)


def _input_mean_square(stats: LayerStats | None) -> Tensor | None:
    """E[x_j²] of the input's columns: what a clipped grid weighs each column's error by
    (None without calibration: every column alike)."""
    return None if stats is None else stats.input_mean_square()


def _imatrix(cfg: LayerConfig, stats: LayerStats | None) -> Tensor | None:
    if cfg.method != "imatrix":
        return None
    if stats is not None and stats.mean_square is not None:
        return stats.mean_square.float().clone()
    if stats is None or stats.H is None:
        raise AutocompressError("method imatrix needs calibration data (the mean x² of each "
                                "input column); calibrate first or use method 'rtn'")
    return imatrix_from_hessian(stats.H)


def _layer(parts: list[CompressedMatrix]) -> CompressedLayer:
    return CompressedLayer([p.factor for p in parts], [p.mask for p in parts],
                           [p.quantized for p in parts])


def _prune_mask(w: Tensor, cfg: LayerConfig, stats: LayerStats | None) -> Tensor:
    sparsity = cfg.effective_sparsity
    if cfg.prune_method == "magnitude":
        return magnitude_mask(w, sparsity, cfg.pattern)
    act_norm = None if stats is None else stats.activation_norms()
    if act_norm is None:
        raise AutocompressError(
            "Wanda pruning needs calibration data (input activation norms); "
            "calibrate first or use prune_method 'magnitude'"
        )
    return wanda_mask(w, act_norm, sparsity, cfg.pattern)


def _gptq(w: Tensor, cfg: LayerConfig, stats: LayerStats | None, mask: Tensor | None,
          settings: GPTQSettings) -> QuantizedWeight:
    if stats is None or stats.H is None:
        raise AutocompressError(
            "GPTQ needs calibration data (the layer's input Hessian); "
            "calibrate first or use method 'rtn'"
        )
    # GPTQ's convention is H = 2·E[x xᵀ]
    gptq = GPTQ.from_hessian(w, 2 * stats.H, stats.n_samples)
    return gptq.quantize(cfg.bits, cfg.group_size, cfg.sym, damp=settings.damp,
                         block_size=settings.block_size, act_order=settings.act_order, mask=mask,
                         clip=cfg.clip)


def _stats_after(B: Tensor, stats: LayerStats | None) -> LayerStats | None:
    """Statistics of B x given those of x: E[(Bx)(Bx)ᵀ] = B H Bᵀ."""
    if stats is None or stats.H is None:
        return None
    return LayerStats(H=B @ stats.H.float() @ B.T, act_norm=None, n_samples=stats.n_samples)


def _check_two_four_rank(w: Tensor, cfg: LayerConfig) -> None:
    """A [out, r] is 2:4-pruned along r, so r must be divisible by 4."""
    rank = rank_for(*w.shape, cfg.rank_ratio)
    if cfg.pattern == "2:4" and rank % 4:
        raise AutocompressError(
            f"2:4 sparsity on low-rank factors needs a rank divisible by 4, but rank_ratio "
            f"{cfg.rank_ratio} gives rank {rank} for a {w.shape[0]}x{w.shape[1]} layer; "
            "change rank_ratio or use unstructured sparsity"
        )
