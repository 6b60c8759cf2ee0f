"""Fused dequantize-and-multiply Triton kernels for packed matrices: y = x Wᵀ.

W never exists in memory: each program decodes the tile of W it needs straight from the packed
bit stream (runtime/packed.py) and multiplies it at once.

- Code e of a b-bit stream sits at bits [e·b, e·b + b): byte e·b >> 3, shift e·b & 7. For b
  dividing 8 a code never crosses a byte; otherwise (3, 5, 6) the next byte is read too and
  v = ((lo | hi << 8) >> shift) & (2^b − 1).
- Dense layout: W[n, k] is code n·K + k.
- 2:4 layout: the dense column k is position p = k mod 4 of group k // 4, whose two kept values
  are codes j = n·K/2 + 2·(k // 4) + {0, 1} with positions idx_j (2-bit codes at
  ``meta_start + j``); W[n, k] = value of the slot whose idx equals p, else 0.
- Either way W[n, k] = (v − z[n, g]) · s[n, g] with g = k // group_width (float16 s and z;
  z = 2^(b−1) when symmetric).

GEMV (one row of x: decode) reduces a [BLOCK_N, BLOCK_K] tile against x with a sum; GEMM
(prefill) uses ``tl.dot`` on [BLOCK_M, BLOCK_K] × [BLOCK_K, BLOCK_N] tiles.

Block sizes are fixed here; on a GPU ``tuned.py`` wraps the same kernels in ``triton.autotune``.
That module is imported only when a CUDA device is present and the interpreter is off, so
nothing autotuned is ever imported on a machine without a GPU driver.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..packed import PackedMatrix

TRITON_BITS = (2, 3, 4, 5, 6, 8)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # read by @triton.jit at import
# fixed tiles: small under the interpreter (numpy, one program at a time), GPU-sized otherwise
GEMV_BLOCKS = dict(BLOCK_N=16, BLOCK_K=32) if INTERPRETED else dict(BLOCK_N=64, BLOCK_K=128)
GEMM_BLOCKS = (dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32) if INTERPRETED
               else dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32))


def triton_unsupported_reason(matrix: PackedMatrix) -> str | None:
    if matrix.bits not in TRITON_BITS:
        return f"{matrix.bits}-bit weights (the kernels run 2, 3, 4, 5, 6 and 8 bits)"
    if matrix.layout not in ("dense", "2:4"):
        return f"{matrix.layout} sparse weights (the kernels run dense and 2:4 weights)"
    return None


@triton.jit
def _read_codes(stream_ptr, index, BITS: tl.constexpr, mask):
    """b-bit codes number ``index`` (int64 tensor) of a little-endian bit stream."""
    bit = index * BITS
    byte = bit >> 3
    shift = (bit & 7).to(tl.int32)
    lo = tl.load(stream_ptr + byte, mask=mask, other=0).to(tl.int32)
    if 8 % BITS == 0:
        value = lo >> shift
    else:
        crosses = mask & (shift + BITS > 8)
        hi = tl.load(stream_ptr + byte + 1, mask=crosses, other=0).to(tl.int32)
        value = (lo | (hi << 8)) >> shift
    return value & ((1 << BITS) - 1)


@triton.jit
def _weight_tile(data_ptr, scale_ptr, zero_ptr, offs_n, offs_k, N, K, n_groups, group_width,
                 meta_start, BITS: tl.constexpr, SYM: tl.constexpr, TWO_FOUR: tl.constexpr):
    """Float32 tile W[offs_n, offs_k], [BLOCK_N, BLOCK_K]; 0 outside the matrix."""
    n = offs_n[:, None].to(tl.int64)
    k = offs_k[None, :].to(tl.int64)
    inside = (n < N) & (k < K)
    if TWO_FOUR:
        first = n * (K // 2) + (k // 4) * 2
        idx0 = _read_codes(data_ptr, meta_start + first, 2, inside)
        idx1 = _read_codes(data_ptr, meta_start + first + 1, 2, inside)
        position = (k % 4).to(tl.int32)
        v0 = _read_codes(data_ptr, first, BITS, inside)
        v1 = _read_codes(data_ptr, first + 1, BITS, inside)
        codes = tl.where(position == idx0, v0, v1)
        kept = inside & ((position == idx0) | (position == idx1))
    else:
        codes = _read_codes(data_ptr, n * K + k, BITS, inside)
        kept = inside
    param = n * n_groups + k // group_width
    scale = tl.load(scale_ptr + param, mask=inside, other=0.0).to(tl.float32)
    if SYM:
        zero = (1 << (BITS - 1)) * 1.0
    else:
        zero = tl.load(zero_ptr + param, mask=inside, other=0.0).to(tl.float32)
    weight = (codes.to(tl.float32) - zero) * scale
    return tl.where(kept, weight, 0.0)


@triton.jit
def packed_gemv_kernel(x_ptr, data_ptr, scale_ptr, zero_ptr, y_ptr, N, K, n_groups, group_width,
                       meta_start, stride_xm, stride_ym, BITS: tl.constexpr, SYM: tl.constexpr,
                       TWO_FOUR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[m, n] = Σ_k x[m, k] W[n, k]: one program per (BLOCK_N outputs, row m)."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        w = _weight_tile(data_ptr, scale_ptr, zero_ptr, offs_n, offs_k, N, K, n_groups,
                         group_width, meta_start, BITS, SYM, TWO_FOUR)
        acc += tl.sum(w * x[None, :], axis=1)
    tl.store(y_ptr + m * stride_ym + offs_n, acc, mask=offs_n < N)


@triton.jit
def packed_gemm_kernel(x_ptr, data_ptr, scale_ptr, zero_ptr, y_ptr, M, N, K, n_groups,
                       group_width, meta_start, stride_xm, stride_ym, BITS: tl.constexpr,
                       SYM: tl.constexpr, TWO_FOUR: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y = x Wᵀ tile by tile: one program per [BLOCK_M, BLOCK_N] tile of y."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = _weight_tile(data_ptr, scale_ptr, zero_ptr, offs_n, offs_k, N, K, n_groups,
                         group_width, meta_start, BITS, SYM, TWO_FOUR)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc,
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def packed_matmul(x: Tensor, matrix: PackedMatrix, out: Tensor | None = None,
                  kind: str | None = None) -> Tensor:
    """y = x Wᵀ (float32 [M, N]) for x [M, K]; ``kind`` 'gemv' | 'gemm' (default: gemv for
    M = 1). ``out`` receives the result when given (every element is written)."""
    reason = triton_unsupported_reason(matrix)
    if reason:
        raise ValueError(f"no Triton kernel for {reason}")
    m_rows, k = x.shape
    n = matrix.out_features
    if k != matrix.in_features:
        raise ValueError(f"x has {k} columns, the matrix {matrix.in_features}")
    x = x.contiguous()
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        x = x.float()
    y = torch.empty(m_rows, n, dtype=torch.float32, device=x.device) if out is None else out
    kind = kind or ("gemv" if m_rows == 1 else "gemm")
    data = matrix.data
    zero = matrix.scale if matrix.zero is None else matrix.zero  # unread when symmetric
    meta_start = matrix.meta_start if matrix.layout == "2:4" else 0
    args = (data, matrix.scale, zero, y)
    shape = (n, k, matrix.n_groups, matrix.group_width, meta_start)
    flags = dict(BITS=matrix.bits, SYM=matrix.sym, TWO_FOUR=matrix.layout == "2:4")
    tuned = _tuned()
    if kind == "gemv":
        kernel, blocks = (tuned.gemv, {}) if tuned else (packed_gemv_kernel, GEMV_BLOCKS)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), m_rows)  # noqa: E731
        kernel[grid](x, *args, *shape, x.stride(0), y.stride(0), **flags, **blocks)
    elif kind == "gemm":
        kernel, blocks = (tuned.gemm, {}) if tuned else (packed_gemm_kernel, GEMM_BLOCKS)
        grid = lambda meta: (triton.cdiv(m_rows, meta["BLOCK_M"]),  # noqa: E731
                             triton.cdiv(n, meta["BLOCK_N"]))
        kernel[grid](x, data, matrix.scale, zero, y, m_rows, *shape, x.stride(0), y.stride(0),
                     **flags, **blocks)
    else:
        raise ValueError(f"kind must be 'gemv' or 'gemm', got {kind!r}")
    return y


def _tuned():
    """The autotuned kernels on a real GPU; None under the interpreter or without CUDA."""
    if INTERPRETED or not torch.cuda.is_available():
        return None
    from . import tuned

    return tuned
