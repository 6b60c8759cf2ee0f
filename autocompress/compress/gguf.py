"""A matrix in a GGUF type, made by llama.cpp's own quantizer: the bytes a GGUF file stores
and the float weights they decode to (what the torch engine computes with).

The importance matrix of ``method: imatrix`` is llama.cpp's: the mean of x² of each input
column over the calibration tokens, which is the diagonal of the layer's E[x xᵀ].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..gguf_types import GGUFType, type_for_row


@dataclass
class GGUFWeight:
    """A [rows, n] matrix as GGUF bytes (rows in the order given, one row of blocks each)."""

    type: GGUFType  # after llama.cpp's fallback for the row length
    data: np.ndarray  # uint8 [rows, row bytes]
    shape: tuple[int, int]

    def dequantize(self) -> Tensor:
        from ..engines.llamacpp import dequantize

        return torch.from_numpy(dequantize(self.data, self.type.name, self.shape))

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


def imatrix_from_hessian(H: Tensor) -> Tensor:
    """llama.cpp's importance of each input column: mean x², the diagonal of E[x xᵀ]."""
    return H.diagonal().float().clone()


def quantize_gguf(w: Tensor, type_name: str, imatrix: Tensor | None = None) -> GGUFWeight:
    """``w`` [out, in] quantized to ``type_name`` (or its fallback for rows of this length)."""
    from ..engines.llamacpp import quantize

    rows, n = w.shape
    gtype = type_for_row(type_name, n)
    weights = None if imatrix is None else imatrix.detach().float().cpu().numpy()
    data = quantize(w.detach().float().cpu().numpy(), gtype.name,
                    None if gtype.is_float else weights)
    return GGUFWeight(gtype, data, (rows, n))
