"""Packed storage of a compressed linear layer: exactly the bytes accounting.py counts.

A ``PackedMatrix`` is one [out, in] matrix in one of three layouts:

- ``dense``:  every weight's code, out·in codes;
- ``2:4``:    the two kept codes of every 4 input columns (out·in/2 codes) and, per kept code,
              its 2-bit position within its 4; the dense column of kept value j is 4·(j // 2) + idx;
- ``bitmap``: the kept codes in row-major order and a 1-bit-per-position keep bitmap.

All of it lives in one little-endian bit stream, ``data`` (packing.py): the n_kept values at
``bits`` each (float16 bit patterns at 16 bits), then the sparsity metadata from bit
n_kept·bits on (a multiple of the metadata width, so it reads as a stream of 1- or 2-bit codes
starting at code n_kept·bits / width). One stream per matrix is what accounting.py counts.

At ``bits`` < 16 a kept weight is w = (q − z) · s with the code q of its *dense* column's group
(groups run along the input dimension; the last one is shorter when ``group_size`` does not
divide ``in``): ``scale`` s is float16 [out, n_groups]; ``zero`` z is float16 [out, n_groups]
when asymmetric and the constant 2^(b−1) when symmetric (not stored). z is the integer zero
point of quant.py, which may lie outside [0, 2^b − 1] (a group whose values share one sign);
float16 holds such integers exactly up to |z| = 2048. At 16 bits the kept values are float16.

A ``PackedLinear`` is one matrix, or the two factors A [out, r] and B [r, in] of a low-rank
layer (y = A (B x)). ``nbytes()``, the sum of its buffers, equals accounting.layer_bytes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from ..accounting import n_groups
from ..compress.quant import QuantizedWeight
from ..compress.weights import CompressedLayer
from ..errors import AutocompressError
from ..plan import LayerConfig
from .packing import (
    pack_codes,
    two_four_columns,
    two_four_indices,
    unpack_codes,
)

FP16_MAX = 65504.0
LAYOUTS = ("dense", "2:4", "bitmap")
META_BITS = {"dense": 0, "2:4": 2, "bitmap": 1}


@dataclass
class PackedMatrix:
    """One [out, in] matrix as stored (see the module docstring for the maths)."""

    out_features: int
    in_features: int
    bits: int  # 2..8, or 16 = float16 values
    group_size: int  # -1 = one group per row
    sym: bool
    layout: str  # dense | 2:4 | bitmap
    data: Tensor  # uint8 bit stream: the kept values, then the sparsity metadata
    scale: Tensor | None  # float16 [out, n_groups]; None at 16 bits
    zero: Tensor | None  # float16 [out, n_groups]; None when symmetric or at 16 bits
    n_kept: int  # number of stored values
    # awq: float16 [in]; the matrix's input is divided by it (QuantLinear), so the weight it
    # stands for is the decoded one divided column-wise by it
    input_scale: Tensor | None = None

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_parts(cls, factor: Tensor, mask: Tensor | None, quantized: QuantizedWeight | None,
                   cfg: LayerConfig) -> "PackedMatrix":
        """Pack one compressed matrix: ``factor`` is its dequantized float weight, ``mask`` its
        keep-mask (None = dense), ``quantized`` its codes and grid (None at 16 bits)."""
        out_features, in_features = factor.shape
        layout = "dense" if mask is None else ("2:4" if cfg.pattern == "2:4" else "bitmap")
        meta, columns = None, None
        if layout == "2:4":
            meta = two_four_indices(mask)
            columns = two_four_columns(meta)
        elif layout == "bitmap":
            meta = mask
        if quantized is None:
            kept = _kept(factor.to(torch.float16), mask, layout, columns)
            values = kept.contiguous().view(torch.uint8)
            scale = zero = None
            bits, group_size, sym = 16, cfg.group_size, cfg.sym
        else:
            kept = _kept(quantized.q, mask, layout, columns)
            bits, group_size, sym = quantized.bits, quantized.group_size, quantized.sym
            values = pack_codes(kept, bits)
            scale, zero = _float16_grid(quantized)
            zero = None if sym else zero
        data = values if meta is None else _append_codes(values, kept.numel() * bits, meta,
                                                          META_BITS[layout])
        input_scale = None if quantized is None or quantized.input_scale is None else \
            quantized.input_scale.to(torch.float16)
        return cls(out_features, in_features, bits, group_size, sym, layout, data, scale, zero,
                   kept.numel(), input_scale)

    def to(self, device: torch.device | str) -> "PackedMatrix":
        """The same matrix with its tensors on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(self, data=move(self.data), scale=move(self.scale),
                                   zero=move(self.zero), input_scale=move(self.input_scale))

    def clone(self) -> "PackedMatrix":
        """The same matrix in its own memory."""
        copy = lambda t: None if t is None else t.clone()  # noqa: E731
        return dataclasses.replace(self, data=copy(self.data), scale=copy(self.scale),
                                   zero=copy(self.zero), input_scale=copy(self.input_scale))

    # -- reading ------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def n_groups(self) -> int:
        return n_groups(self.in_features, self.group_size)

    @property
    def group_width(self) -> int:
        return self.in_features if self.group_size == -1 else self.group_size

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.data, self.scale, self.zero, self.input_scale) if t is not None)

    def zero_points(self) -> Tensor:
        """z as float32 [out, n_groups] (the constant 2^(b−1) when symmetric)."""
        if self.zero is not None:
            return self.zero.float()
        return torch.full((self.out_features, self.n_groups), float(2 ** (self.bits - 1)))

    def dense_codes(self) -> Tensor:
        """Codes of a dense-layout matrix, uint8 [out, in]."""
        if self.layout != "dense" or self.bits == 16:
            raise ValueError("dense_codes() needs a dense quantized matrix")
        return unpack_codes(self.data, self.bits, self.n_kept).reshape(self.shape)

    def codes_and_mask(self) -> tuple[Tensor, Tensor]:
        """Codes of a quantized matrix in its dense positions, uint8 [out, in] (0 where
        pruned), and the keep-mask, bool [out, in] (all True for a dense layout)."""
        if self.bits == 16:
            raise ValueError("codes_and_mask() needs a quantized matrix")
        if self.layout == "dense":
            return self.dense_codes(), torch.ones(self.shape, dtype=torch.bool)
        codes = torch.zeros(self.shape, dtype=torch.uint8)
        kept = unpack_codes(self.data, self.bits, self.n_kept)
        if self.layout == "2:4":
            columns = two_four_columns(self._meta(0, self.n_kept).reshape(self.out_features, -1))
            codes.scatter_(1, columns, kept.reshape(self.out_features, -1))
            return codes, torch.zeros_like(codes, dtype=torch.bool).scatter_(1, columns, True)
        mask = self._bitmap_rows(0, self.out_features)
        codes[mask] = kept
        return codes, mask

    def dequantize(self) -> Tensor:
        """The float32 weight [out, in] the matrix stands for (with awq, the stored weight
        divided column-wise by the input scale)."""
        w = self.dequantize_rows(0, self.out_features)
        return w if self.input_scale is None else w / self.input_scale.float()

    def dequantize_rows(self, start: int, stop: int) -> Tensor:
        """Float32 rows [start, stop) of the stored weight, decoding only their part of each
        stream (with awq, of the scaled weight: the kernels' input is divided by the scale)."""
        rows = stop - start
        w = torch.zeros(rows, self.in_features, dtype=torch.float32)
        if self.layout == "dense":
            w.copy_(self._values(start * self.in_features, rows * self.in_features)
                    .reshape(rows, self.in_features))
            return self._apply_grid(w, start, stop, None)
        if self.layout == "2:4":
            half = self.in_features // 2
            indices = self._meta(start * half, rows * half).reshape(rows, half)
            columns = two_four_columns(indices)
            kept = self._values(start * half, rows * half).reshape(rows, half)
            w.scatter_(1, columns, kept)
            return self._apply_grid(w, start, stop, columns)
        mask = self._bitmap_rows(start, stop)
        first = self._kept_before(start)
        w[mask] = self._values(first, int(mask.sum()))
        return self._apply_grid(w, start, stop, None, mask)

    # -- helpers ------------------------------------------------------------------------------
    @property
    def meta_start(self) -> int:
        """Index of the first metadata code in ``data`` read as a stream of metadata codes."""
        return self.n_kept * self.bits // META_BITS[self.layout]

    def _values(self, start: int, count: int) -> Tensor:
        if self.bits == 16:
            return self.data[2 * start:2 * (start + count)].view(torch.float16).float()
        return unpack_codes(self.data, self.bits, count, start).float()

    def _meta(self, start: int, count: int) -> Tensor:
        return unpack_codes(self.data, META_BITS[self.layout], count, self.meta_start + start)

    def _apply_grid(self, codes: Tensor, start: int, stop: int, columns: Tensor | None,
                    mask: Tensor | None = None) -> Tensor:
        """codes -> (codes − z) · s in place, then re-zero the pruned positions."""
        if self.bits == 16:
            return codes
        group_of_column = torch.arange(self.in_features) // self.group_width
        scale = self.scale[start:stop].float()[:, group_of_column]
        zero = self.zero_points()[start:stop][:, group_of_column]
        codes.sub_(zero).mul_(scale)
        if self.layout == "2:4":
            keep = torch.zeros_like(codes, dtype=torch.bool).scatter_(1, columns, True)
            codes.masked_fill_(~keep, 0.0)
        elif mask is not None:
            codes.masked_fill_(~mask, 0.0)
        return codes

    def _bitmap_rows(self, start: int, stop: int) -> Tensor:
        n = (stop - start) * self.in_features
        return self._meta(start * self.in_features, n).reshape(-1, self.in_features).bool()

    def _kept_before(self, row: int) -> int:
        if row == 0:
            return 0
        return int(self._meta(0, row * self.in_features).sum())


@dataclass
class PackedLinear:
    """A linear layer's packed weight: [W] or the low-rank factors [A, B] (y = A (B x))."""

    matrices: list[PackedMatrix]
    config: LayerConfig

    @classmethod
    def from_compressed(cls, compressed: CompressedLayer, cfg: LayerConfig) -> "PackedLinear":
        mats = [PackedMatrix.from_parts(f, m, q, cfg) for f, m, q
                in zip(compressed.factors, compressed.masks, compressed.quantized)]
        return cls(mats, cfg)

    @property
    def in_features(self) -> int:
        return self.matrices[-1].in_features

    @property
    def out_features(self) -> int:
        return self.matrices[0].out_features

    def nbytes(self) -> int:
        return sum(m.nbytes() for m in self.matrices)

    def dequantize(self) -> Tensor:
        """The effective float32 weight [out, in] (A·B for a low-rank layer)."""
        if len(self.matrices) == 1:
            return self.matrices[0].dequantize()
        return self.matrices[0].dequantize() @ self.matrices[1].dequantize()


def _kept(values: Tensor, mask: Tensor | None, layout: str, columns: Tensor | None) -> Tensor:
    """The stored values of a matrix, flat, in storage order."""
    if layout == "dense":
        return values.reshape(-1)
    if layout == "2:4":
        return values.gather(1, columns).reshape(-1)
    return values[mask]


def _append_codes(stream: Tensor, n_bits: int, codes: Tensor, bits: int) -> Tensor:
    """``stream`` (holding ``n_bits`` bits) followed by ``codes`` packed at ``bits`` each, from
    bit ``n_bits`` on (a multiple of ``bits``): the codes are packed behind as many zero codes
    as put them at the right bit of the stream's last byte, and or-ed in."""
    lead = (n_bits % 8) // bits
    tail = pack_codes(torch.cat([codes.new_zeros(lead), codes.reshape(-1)]), bits)
    first = n_bits // 8
    data = torch.zeros(first + tail.numel(), dtype=torch.uint8)
    data[:stream.numel()] = stream
    data[first:] |= tail
    return data


def _float16_grid(quantized: QuantizedWeight) -> tuple[Tensor, Tensor]:
    """(scale, zero) in float16. A zero beyond float16's range (a near-constant group, where
    scale is tiny) is clamped and its scale stretched to keep z·s, the group's offset: the
    codes' term q·s changes by at most q·s·(z/z' − 1), a few units of the group's tiny range."""
    scale, zero = quantized.scale.float(), quantized.zero.float()
    clamped = zero.clamp(-FP16_MAX, FP16_MAX)
    scale = torch.where(clamped != zero, scale * zero / clamped, scale)
    if not torch.isfinite(scale.half()).all():
        raise AutocompressError("a quantization scale exceeds float16's range (weights > 1e6?); "
                                "packed storage keeps scales in float16")
    return scale.half(), clamped.half()
