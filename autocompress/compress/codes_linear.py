"""A linear layer held as its quantization codes while a plan is in place.

The meters (levels 2 and 3) put a candidate into the model, measure it and take it out again.
Held dense, a candidate's weights cost 4 bytes a weight in float32, as much as the model; held
as codes with their group scales and zeros, a byte or less: codes of 4 bits or fewer are kept
two to a byte, half the memory of the 1.5B's level-3 worker's codes at 4 bits (a memo's shared
codes excepted: a packed copy beside them would add, not save). The weight is decoded on every
forward, with the same two float32 operations as ``QuantizedWeight.dequantize``, so the layer
computes bit for bit what the dense weight computes (tested); unpacking two codes a byte did
not measurably slow a 512-token forward of one layer at one thread here.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from .quant import QuantizedWeight


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes < 16, [out, in] with in even -> [out, in / 2], two codes a byte."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def _unnibble(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``_nibbles``."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=2).reshape(packed.shape[0], -1)


class CodesLinear(nn.Module):
    """y = x Wᵀ + b with W decoded from ``quantized`` on each use."""

    def __init__(self, quantized: QuantizedWeight, bias: torch.Tensor | None,
                 dtype: torch.dtype, pack: bool = True):
        """``pack``: False where ``quantized`` is also kept elsewhere (a memo's entry): the
        layer then shares its codes instead of holding a packed copy beside them."""
        super().__init__()
        self.bias = bias
        self.dtype = dtype
        self.out_features, self.in_features = quantized.q.shape
        self._pack = pack
        self.quantized = quantized

    @property
    def quantized(self) -> QuantizedWeight:
        """The layer's codes and grid (unpacked anew where they are held two to a byte)."""
        held = self._held
        return held if not self._packed else replace(held, q=_unnibble(held.q))

    @quantized.setter
    def quantized(self, value: QuantizedWeight) -> None:
        if not value.q.is_contiguous():
            # row-major, as nn.Linear holds a weight: the decoded weight's layout picks the
            # matmul kernel, and another layout sums in another order (low-rank factors come
            # out of the SVD transposed)
            value = replace(value, q=value.q.contiguous())
        self._packed = self._pack and value.bits <= 4 and value.q.shape[1] % 2 == 0
        self._held = replace(value, q=_nibbles(value.q)) if self._packed else value

    def held_bytes(self) -> int:
        """Bytes of the codes, scales, zeros (and input scale) this layer holds."""
        held = self._held
        return sum(t.numel() * t.element_size() for t in
                   (held.q, held.scale, held.zero, held.input_scale) if t is not None)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (decoded now; nothing keeps it)."""
        return decode(self.quantized).to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def decode(quantized: QuantizedWeight) -> torch.Tensor:
    """``quantized.dequantize()``, element for element, without expanding the group scales
    and zeros to the weight's shape first (one temporary instead of three)."""
    q = quantized.q
    out, width = q.shape
    group = width if quantized.group_size == -1 else quantized.group_size
    if width % group:
        return quantized.dequantize()
    codes = q.view(out, width // group, group).float()
    decoded = ((codes - quantized.zero[:, :, None]) * quantized.scale[:, :, None]).view(out, width)
    return decoded if quantized.input_scale is None else decoded / quantized.input_scale
