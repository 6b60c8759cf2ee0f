"""Bit-packing of integer codes, 2:4 metadata and sparsity bitmaps (vectorised torch).

One layout for every width b in 1..8: a matrix of codes is flattened row-major into a single
little-endian bit stream, code e occupying bits [e·b, e·b + b) (bit i of the stream is bit i % 8
of byte i // 8). So a stream of n codes takes exactly ceil(n·b / 8) bytes, which is what
accounting.py counts, rows need not be byte-aligned, and 2-, 4- and 8-bit streams coincide with
ONNX Runtime's MatMulNBits and GGML's low-nibble-first order within a byte.

Packing works on chunks of 8 codes: 8 codes of b bits are exactly b bytes, gathered in one
int64 word v = Σ_i c_i · 2^(b·i) and split into its bytes (and back). Widths that divide 8
(1, 2, 4, 8) have a faster path on uint8 shifts alone.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

CHUNK_CODES = 1 << 20  # codes per chunk of the int64 path: bounds the temporaries (~40 MB)


def packed_nbytes(n_codes: int, bits: int) -> int:
    return math.ceil(n_codes * bits / 8)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Codes (any shape, integer values in [0, 2^bits)) -> uint8 stream of ceil(n·bits/8) bytes."""
    _check_bits(bits)
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    flat = flat.to(torch.uint8)
    n_bytes = packed_nbytes(flat.numel(), bits)
    if 8 % bits == 0:
        return _pack_dividing(flat, bits)[:n_bytes]
    parts = [_pack_chunk(flat[i:i + CHUNK_CODES], bits)
             for i in range(0, flat.numel(), CHUNK_CODES)]
    return torch.cat(parts)[:n_bytes] if parts else torch.empty(0, dtype=torch.uint8)


def unpack_codes(stream: Tensor, bits: int, n_codes: int, start: int = 0) -> Tensor:
    """Codes [start, start + n_codes) of a packed stream, as uint8 (the inverse of pack_codes)."""
    _check_bits(bits)
    if 8 % bits == 0:
        per_byte = 8 // bits
        first, skip = divmod(start, per_byte)
        last = math.ceil((start + n_codes) / per_byte)
        return _unpack_dividing(stream[first:last], bits)[skip:skip + n_codes]
    # decode from the 8-code word holding ``start`` (8 codes = b bytes), then drop the lead-in
    out = torch.empty(n_codes, dtype=torch.uint8)
    for offset in range(0, n_codes, CHUNK_CODES):
        count = min(CHUNK_CODES, n_codes - offset)
        lead = (start + offset) % 8
        first = (start + offset) // 8 * bits
        words = math.ceil((count + lead) / 8)
        out[offset:offset + count] = _unpack_chunk(stream[first:first + words * bits],
                                                   bits)[lead:lead + count]
    return out


def _pack_dividing(flat: Tensor, bits: int) -> Tensor:
    per_byte = 8 // bits
    flat = _pad_to(flat, per_byte).reshape(-1, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    # the shifted codes occupy disjoint bits, so their sum is their bitwise or
    return (flat << shifts).sum(dim=1, dtype=torch.uint8)


def _unpack_dividing(stream: Tensor, bits: int) -> Tensor:
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    return ((stream[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)


def _pack_chunk(flat: Tensor, bits: int) -> Tensor:
    words = _pad_to(flat, 8).reshape(-1, 8).to(torch.int64)
    code_shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64)
    word = (words << code_shifts).sum(dim=1)
    byte_shifts = torch.arange(0, 8 * bits, 8, dtype=torch.int64)
    return ((word[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def _unpack_chunk(stream: Tensor, bits: int) -> Tensor:
    words = _pad_to(stream, bits).reshape(-1, bits).to(torch.int64)
    byte_shifts = torch.arange(0, 8 * bits, 8, dtype=torch.int64)
    word = (words << byte_shifts).sum(dim=1)
    code_shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64)
    return ((word[:, None] >> code_shifts) & ((1 << bits) - 1)).to(torch.uint8).reshape(-1)


def _pad_to(flat: Tensor, multiple: int) -> Tensor:
    pad = -flat.numel() % multiple
    return torch.cat([flat, flat.new_zeros(pad)]) if pad else flat


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"packing needs 1..8 bits per code, got {bits}")


# -- sparsity ---------------------------------------------------------------------------------

def pack_bitmap(mask: Tensor) -> Tensor:
    """Keep-mask (bool, any shape) -> 1 bit per position, row-major, LSB first."""
    return pack_codes(mask.reshape(-1).to(torch.uint8), 1)


def unpack_bitmap(stream: Tensor, shape: tuple[int, ...]) -> Tensor:
    return unpack_codes(stream, 1, math.prod(shape)).reshape(shape).bool()


def two_four_indices(mask: Tensor) -> Tensor:
    """Positions (0..3) of the two kept weights of every group of 4 columns, ascending:
    a 2:4 keep-mask [out, in] -> uint8 [out, in / 2]. Fails unless every group keeps exactly 2."""
    out_features, in_features = mask.shape
    if in_features % 4:
        raise ValueError(f"2:4 storage needs in_features divisible by 4, got {in_features}")
    quads = mask.reshape(out_features, in_features // 4, 4)
    if not bool((quads.sum(dim=2) == 2).all()):
        raise ValueError("mask is not 2:4: some group of 4 does not keep exactly 2 weights")
    # sorting the kept positions first (stable) lists them in ascending order
    order = torch.sort((~quads).to(torch.uint8), dim=2, stable=True).indices[..., :2]
    return order.to(torch.uint8).reshape(out_features, in_features // 2)


def two_four_columns(indices: Tensor) -> Tensor:
    """Dense column of every kept value: index + 4 · (its group) for indices [out, in / 2]."""
    kept = indices.shape[-1]
    group = torch.arange(kept, dtype=torch.int64) // 2
    return indices.to(torch.int64) + 4 * group
