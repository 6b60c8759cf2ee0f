"""Low-rank factorisation W ≈ A·B, A [out, r], B [r, in].

- Plain: truncated SVD W = U Σ Vᵀ, A = U_r Σ_r^½, B = Σ_r^½ V_rᵀ; the best rank-r approximation
  in ‖W − AB‖_F (Eckart–Young).
- Activation-aware (SVD-LLM, Wang et al. 2024): with the input second moment H = E[x xᵀ] = S Sᵀ
  (S lower Cholesky), E‖(W − AB) x‖² = ‖(W − AB) S‖_F², so truncating the SVD of W S = U Σ Vᵀ and
  setting A = U_r Σ_r^½, B = Σ_r^½ V_rᵀ S⁻¹ minimises the output error instead of the weight error.
  H is damped by λ = damp · mean(diag H) so that S is invertible.
The decomposition runs in float64; the factors come back as float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..accounting import rank_for
from ..errors import AutocompressError
from .last_result import LastResult


def low_rank_factors(
    w: Tensor, rank_ratio: float, H: Tensor | None = None, damp: float = 0.01
) -> tuple[Tensor, Tensor]:
    """(A, B) at the rank given by ``rank_for``; whitened by H [in, in] when given."""
    return truncated_factors(w, rank_for(*w.shape, rank_ratio), H, damp)


_FACTORS = LastResult()


def sharing_factors():
    """Inside the block, the same factorization asked again (the sensitivity table's low-rank
    options of one weight differ only in how the factors are quantized) is computed once:
    for a 1.5B model's 8960-wide layers the whitened SVD takes seconds. The last one is
    kept."""
    return _FACTORS.sharing()


def truncated_factors(
    w: Tensor, rank: int, H: Tensor | None = None, damp: float = 0.01
) -> tuple[Tensor, Tensor]:
    """(A [out, rank], B [rank, in]) with A @ B the best rank-``rank`` approximation of ``w``."""
    return _FACTORS.get((w, rank, H, damp), lambda: _factors(w, rank, H, damp))


def _factors(w: Tensor, rank: int, H: Tensor | None, damp: float) -> tuple[Tensor, Tensor]:
    if w.dim() != 2:
        raise ValueError(f"expected a [out, in] weight matrix, got shape {tuple(w.shape)}")
    if not 1 <= rank <= min(w.shape):
        raise ValueError(f"rank must be in [1, {min(w.shape)}], got {rank}")
    w = w.detach().double()
    if H is None:
        U, sigma, Vh = torch.linalg.svd(w, full_matrices=False)
        B = sigma[:rank, None].sqrt() * Vh[:rank]
    else:
        S = _whitening_factor(H.detach().double(), damp)
        U, sigma, Vh = torch.linalg.svd(w @ S, full_matrices=False)
        # B = Σ_r^½ V_rᵀ S⁻¹ by a triangular solve rather than an explicit inverse
        B = torch.linalg.solve_triangular(S, sigma[:rank, None].sqrt() * Vh[:rank], upper=False,
                                          left=False)
    A = U[:, :rank] * sigma[:rank].sqrt()
    return A.float(), B.float()


def _whitening_factor(H: Tensor, damp: float) -> Tensor:
    """Lower S with S Sᵀ = H + λI, λ = damp · mean(diag H)."""
    H = H.clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    S, info = torch.linalg.cholesky_ex(H)
    if info.item() != 0:
        raise AutocompressError(
            f"low-rank whitening: the input second-moment matrix is not positive definite with "
            f"damp={damp}; use more calibration samples or a larger damp"
        )
    return S
