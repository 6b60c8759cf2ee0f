"""Pruning masks (True = keep) from per-weight scores.

- magnitude: score_ij = |W_ij|
- Wanda (Sun et al. 2023): score_ij = |W_ij| · ‖X_j‖₂, the weight times the L2 norm of its input
  feature over the calibration tokens; scores are compared within each output row.

Unstructured masks remove the round(sparsity · in) lowest scores of every row, so every row has
the same sparsity. 2:4 masks keep the 2 highest scores of every 4 consecutive input columns
(sparsity 0.5 by construction).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import AutocompressError


def magnitude_mask(w: Tensor, sparsity: float, pattern: str = "unstructured") -> Tensor:
    return mask_from_scores(w.detach().float().abs(), sparsity, pattern)


def wanda_mask(w: Tensor, act_norm: Tensor, sparsity: float,
               pattern: str = "unstructured") -> Tensor:
    if act_norm.shape != (w.shape[1],):
        raise ValueError(f"act_norm must have shape ({w.shape[1]},), got {tuple(act_norm.shape)}")
    scores = w.detach().float().abs() * act_norm.detach().float()[None, :]
    return mask_from_scores(scores, sparsity, pattern)


def prune(w: Tensor, mask: Tensor) -> Tensor:
    """``w`` (float32) with the weights outside ``mask`` set to 0."""
    return torch.where(mask, w.detach().float(), 0.0)


def mask_from_scores(scores: Tensor, sparsity: float, pattern: str) -> Tensor:
    """Keep-mask [out, in] from scores [out, in]; ``sparsity`` is ignored for 2:4 (always 0.5)."""
    if scores.dim() != 2:
        raise ValueError(f"expected [out, in] scores, got shape {tuple(scores.shape)}")
    if pattern == "2:4":
        return _two_four_mask(scores)
    if pattern == "unstructured":
        return _row_mask(scores, sparsity)
    raise ValueError(f"pattern must be 'unstructured' or '2:4', got {pattern!r}")


def _row_mask(scores: Tensor, sparsity: float) -> Tensor:
    n_removed = int(round(sparsity * scores.shape[1]))
    lowest = scores.topk(n_removed, dim=1, largest=False).indices
    return torch.ones_like(scores, dtype=torch.bool).scatter(1, lowest, False)


def _two_four_mask(scores: Tensor) -> Tensor:
    out_features, in_features = scores.shape
    if in_features % 4:
        raise AutocompressError(
            f"2:4 sparsity needs in_features divisible by 4, but this layer has {in_features}; "
            "use unstructured sparsity for it"
        )
    quads = scores.reshape(out_features, in_features // 4, 4)
    highest = quads.topk(2, dim=2).indices
    keep = torch.zeros_like(quads, dtype=torch.bool).scatter(2, highest, True)
    return keep.reshape(out_features, in_features)
