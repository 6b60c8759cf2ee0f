"""A linear layer held as its quantization codes while a plan is in place.

The meters (levels 2 and 3) put a candidate into the model, measure it and take it out again.
Held dense, a candidate's weights cost 4 bytes a weight in float32, as much as the model; held
as codes (uint8) with their group scales and zeros, 1 byte and a little. The weight is decoded
on every forward, with the same two float32 operations as ``QuantizedWeight.dequantize``, so
the layer computes bit for bit what the dense weight computes (tested); decoding costs about
4% of a 512-token forward's matmul on this CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quant import QuantizedWeight


class CodesLinear(nn.Module):
    """y = x Wᵀ + b with W decoded from ``quantized`` on each use."""

    def __init__(self, quantized: QuantizedWeight, bias: torch.Tensor | None,
                 dtype: torch.dtype):
        super().__init__()
        self.quantized = quantized
        self.bias = bias
        self.dtype = dtype
        self.out_features, self.in_features = quantized.q.shape

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
