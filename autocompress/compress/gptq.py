"""GPTQ (Frantar et al. 2022), after IST-DASLab's reference ``gptq.py``, with an optional
SparseGPT-style (Frantar & Alistarh 2023) prune mask.

Minimises the layer's output error ‖(W − Ŵ) X‖² one input column at a time. With
H = 2/n Σ x xᵀ and U the upper Cholesky factor of H⁻¹ (UᵀU = H⁻¹), quantizing column i to q
leaves err = (w_i − q_i) / U_ii, which the columns j > i absorb optimally as w_j −= err · U_ij
(the OBS update). Columns are processed in blocks: inside a block the update is applied column by
column, to the later blocks lazily, once per block, as one matrix product.
The reported loss is Σ (w_i − q_i)² / (2 U_ii²) = ½ tr(ΔW H ΔWᵀ) for the damped H.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..errors import AutocompressError
from .last_result import LastResult
from .quant import QuantizedWeight, dequantize_codes, group_params, n_groups, quantize_with_params


class GPTQ:
    """Accumulates the Hessian of one linear layer, then quantizes its weight."""

    def __init__(self, weight: Tensor) -> None:
        if weight.dim() != 2:
            raise ValueError(f"expected a [out, in] weight matrix, got shape {tuple(weight.shape)}")
        self.weight = weight.detach().float()
        self.H = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float32,
                             device=weight.device)
        self.n_samples = 0
        self.last_error: float | None = None

    @classmethod
    def from_hessian(cls, weight: Tensor, H: Tensor, n: int) -> "GPTQ":
        """Start from an existing H (GPTQ's convention, 2/n Σ x xᵀ; any positive multiple gives the
        same quantization) of ``n`` inputs, e.g. one H shared by q/k/v projections."""
        gptq = cls(weight)
        if H.shape != gptq.H.shape:
            raise ValueError(f"H must be {tuple(gptq.H.shape)}, got {tuple(H.shape)}")
        gptq.H = H.detach().float()
        gptq.n_samples = n
        return gptq

    def add_batch(self, x: Tensor) -> None:
        """Fold inputs x [..., in] into the running mean H = 2/n Σ x xᵀ (n counts rows of x)."""
        x = x.detach().reshape(-1, self.H.shape[0]).float()
        total = self.n_samples + x.shape[0]
        # not in place: H may be shared with other layers through from_hessian
        self.H = self.H * (self.n_samples / total) + (2 / total) * (x.T @ x)
        self.n_samples = total

    def quantize(
        self,
        bits: int,
        group_size: int,
        sym: bool,
        damp: float = 0.01,
        block_size: int = 128,
        act_order: bool = False,
        mask: Tensor | None = None,
        static_groups: bool = False,
        clip: bool = False,
    ) -> QuantizedWeight:
        """Quantize the weight; codes, scales and zeros come back in the original column order.

        - Group parameters: by default each group's scale/zero is taken from its columns' current
          (already error-updated) weights when its first column is reached, as in the reference.
          ``static_groups`` takes them all from the original weight up-front instead. Per-channel
          (``group_size=-1``) parameters are always taken up-front from the whole row.
        - ``act_order`` processes columns by descending diag(H) and always uses static groups, so
          each column keeps the group of its original position (the scales then describe ordinary
          consecutive-column groups, as packed kernels expect).
        - ``mask`` (bool [out, in], True = keep): pruned weights become exactly 0 and their error
          (w − 0) is propagated like a quantization error. Group parameters are computed with the
          pruned weights at 0, so every partly pruned group's grid contains 0 (code = zero).
        - ``clip``: each group's grid is the clipped one (quant.py), its columns' errors weighted
          by diag(H), the mean x² of their inputs.
        """
        if self.n_samples == 0:
            raise ValueError("GPTQ needs calibration inputs: call add_batch() or from_hessian()")
        if mask is not None and mask.shape != self.weight.shape:
            raise ValueError(f"mask must be {tuple(self.weight.shape)}, got {tuple(mask.shape)}")
        W, H = self._without_dead_inputs()
        keep = None if mask is None else mask.bool()
        grid = _Grid.start(W, keep, bits, group_size, sym, static_groups or act_order,
                           importance=H.diagonal().clone() if clip else None)
        if not grid.static:
            # a group must not straddle two blocks: its parameters are read from the block's
            # up-to-date weights when its first column comes up
            block_size = math.ceil(block_size / group_size) * group_size

        order = torch.arange(W.shape[1], device=W.device)
        columns = range(W.shape[1])
        if act_order:
            order = torch.argsort(H.diagonal(), descending=True)
            W, H = W[:, order], H[order][:, order]
            keep = None if keep is None else keep[:, order]
            columns = order.tolist()  # the sweep's Python loop indexes groups by column
        width = W.shape[1] if group_size == -1 else group_size
        group_of_column = [c // width for c in columns]

        U = _upper_cholesky_of_inverse(H, damp)
        del H  # [in, in]: at a 1.5B model's ffn_down 321 MB a copy, not needed by the sweep
        # the numpy sweep is the CPU's fast path (per-operation overhead bounds it there); on
        # any other device the torch sweep runs where the weights are
        if grid.static and W.device.type == "cpu":
            codes, loss = _sweep_static(W, U, keep, grid, group_of_column, block_size)
        else:
            codes, loss = _sweep(W, U, keep, grid, group_of_column, block_size)
        self.last_error = loss
        if act_order:
            codes = codes[:, torch.argsort(order)]
        return QuantizedWeight(codes.to(torch.uint8), grid.scale, grid.zero, bits, group_size, sym)

    def _without_dead_inputs(self) -> tuple[Tensor, Tensor]:
        """A copy of W and H (read only) where inputs that never fire (H_ii = 0) get H_ii = 1
        and weight 0: they do not affect the output, and this keeps H invertible. H is copied
        only when some input is dead (the sweep updates W, never H)."""
        W, H = self.weight.clone(), self.H
        dead = H.diagonal() == 0
        if bool(dead.any()):
            H = H.clone()
            H.diagonal()[dead] = 1
            W[:, dead] = 0
        return W, H


@dataclass
class _Grid:
    """Scale and zero of every group, [out, n_groups], filled up-front when ``static`` and
    group by group during the sweep otherwise."""

    scale: Tensor
    zero: Tensor
    bits: int
    group_size: int
    sym: bool
    static: bool
    importance: Tensor | None = None  # [in] in the original column order: clipped grids

    @classmethod
    def start(cls, W: Tensor, keep: Tensor | None, bits: int, group_size: int, sym: bool,
              static: bool, importance: Tensor | None = None) -> "_Grid":
        static = static or group_size == -1
        if static:
            scale, zero = group_params(_pruned(W, keep), bits, group_size, sym,
                                       clip=importance is not None, importance=importance)
        else:
            scale = torch.empty(W.shape[0], n_groups(W.shape[1], group_size), device=W.device)
            zero = torch.empty_like(scale)
        return cls(scale, zero, bits, group_size, sym, static, importance)

    def starts_group(self, col: int) -> bool:
        return not self.static and col % self.group_size == 0

    def set_group(self, group: int, weights: Tensor) -> None:
        importance = None if self.importance is None else \
            self.importance[group * self.group_size:][:weights.shape[1]]
        scale, zero = group_params(weights, self.bits, -1, self.sym,
                                   clip=importance is not None, importance=importance)
        self.scale[:, group], self.zero[:, group] = scale[:, 0], zero[:, 0]

    def quantize(self, w: Tensor, group: int) -> tuple[Tensor, Tensor]:
        """(codes, dequantized values) of one column on its group's grid."""
        scale, zero = self.scale[:, group], self.zero[:, group]
        codes = quantize_with_params(w, scale, zero, self.bits)
        return codes, dequantize_codes(codes, scale, zero)


def _sweep(W: Tensor, U: Tensor, keep: Tensor | None, grid: _Grid, group_of_column: list[int],
           block_size: int) -> tuple[Tensor, float]:
    """Quantize the columns of W (updated in place) left to right; returns (codes, loss)."""
    columns = W.shape[1]
    codes = torch.zeros_like(W)
    loss = 0.0
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1 = W[:, i1:i2].clone()
        err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col, group = i1 + i, group_of_column[i1 + i]
            if grid.starts_group(col):
                group_keep = None if keep is None else keep[:, col:col + grid.group_size]
                grid.set_group(group, _pruned(W1[:, i:i + grid.group_size], group_keep))
            w = W1[:, i]
            target = w if keep is None else torch.where(keep[:, col], w, 0.0)  # pruned -> 0
            codes[:, col], q = grid.quantize(target, group)
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]  # OBS update inside the block
            err1[:, i] = err
        loss += float(err1.pow(2).sum()) / 2
        W[:, i2:] -= err1 @ U[i1:i2, i2:]  # lazy update of the later blocks
    return codes, loss


def _sweep_static(W: Tensor, U: Tensor, keep: Tensor | None, grid: _Grid,
                  group_of_column: list[int], block_size: int) -> tuple[Tensor, float]:
    """``_sweep`` for grids fixed up-front (act-order, static groups, per channel): the same
    OBS updates, with each column's pending in-block update gathered when the column comes up
    (w_j − Σ_{i<j} err_i U_ij, one vector-matrix product) instead of applied to the whole rest
    of the block after every column, columns stored contiguously (Wᵀ), and the per-column loop
    in numpy (a microsecond per operation against torch's several). Equal to ``_sweep`` up to
    float rounding; on SmolLM2's layers 3-4x faster on this CPU, where the reference loop is
    bound by per-operation overhead."""
    columns = W.shape[1]
    qmax = float(2**grid.bits - 1)
    scale_t = grid.scale.T[group_of_column].contiguous().numpy()  # [in, out]: each column's grid
    zero_t = grid.zero.T[group_of_column].contiguous().numpy()
    keep_t = None if keep is None else keep.T.contiguous().numpy()
    codes_t = np.empty((columns, W.shape[0]), dtype=np.float32)
    loss = 0.0
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1 = W[:, i1:i2].T.contiguous().numpy()  # [n, out]
        err1 = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2].contiguous().numpy()
        for i in range(i2 - i1):
            col = i1 + i
            w = W1[i] - U1[:i, i] @ err1[:i] if i else W1[i]
            target = w if keep_t is None else np.where(keep_t[col], w, np.float32(0))
            q = np.clip(np.round(target / scale_t[col]) + zero_t[col], 0, qmax)
            codes_t[col] = q
            err1[i] = (w - (q - zero_t[col]) * scale_t[col]) / U1[i, i]
        loss += float(np.square(err1, dtype=np.float64).sum()) / 2
        W[:, i2:] -= torch.from_numpy(err1).T @ U[i1:i2, i2:]  # lazy update of later blocks
    return torch.from_numpy(codes_t).T.contiguous(), loss


def _pruned(w: Tensor, keep: Tensor | None) -> Tensor:
    return w if keep is None else torch.where(keep, w, 0.0)


_FACTORS = LastResult()


def sharing_factors():
    """Inside the block, GPTQ runs on the same Hessian reuse its factor U instead of
    computing it again: the sensitivity table quantizes one weight to several options (3-bit,
    4-bit, two group sizes) with one H, and for a 1.5B model's ffn_down (8960 inputs) the
    factorization is most of GPTQ's time. The same U, so the same codes; one kept at a time."""
    return _FACTORS.sharing()


def _upper_cholesky_of_inverse(H: Tensor, damp: float) -> Tensor:
    """U with UᵀU = (H + λI)⁻¹, λ = damp · mean(diag H)."""
    return _FACTORS.get((H, damp), lambda: _factor(H, damp))


def _factor(H: Tensor, damp: float) -> Tensor:
    # each [in, in] intermediate is dropped as soon as the next exists: two alive at a time
    # (not four), the same operations and so the same U
    damped = H.clone()
    damped.diagonal().add_(damp * H.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(damped)
    del damped
    if info.item() != 0:
        raise AutocompressError(
            f"GPTQ: the calibration Hessian is not positive definite even with damp={damp}; "
            "use more calibration samples or a larger damp"
        )
    inverse = torch.cholesky_inverse(L)
    del L
    return torch.linalg.cholesky(inverse, upper=True)
