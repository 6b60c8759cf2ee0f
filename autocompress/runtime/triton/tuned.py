"""Autotuned variants of the packed kernels, for a real GPU only.

Imported by kernels.py only when CUDA is available and the interpreter is off: ``triton.autotune``
benchmarks configurations on the device, which the interpreter and driverless machines cannot.
The configurations are tuned per (N, K) (and M for GEMM) on first use.
"""

from __future__ import annotations

import triton

from .kernels import packed_gemm_kernel, packed_gemv_kernel

gemv = triton.autotune(
    configs=[triton.Config(dict(BLOCK_N=bn, BLOCK_K=bk), num_warps=w)
             for bn, bk, w in ((32, 128, 4), (64, 128, 4), (64, 256, 4), (128, 128, 8),
                               (16, 256, 4), (128, 64, 4))],
    key=["N", "K", "BITS", "TWO_FOUR"],
)(packed_gemv_kernel)

gemm = triton.autotune(
    configs=[triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=s)
             for bm, bn, bk, w, s in ((64, 64, 32, 4, 3), (128, 128, 32, 8, 3),
                                      (64, 128, 64, 4, 3), (128, 64, 64, 8, 4),
                                      (32, 64, 64, 4, 4), (16, 64, 128, 4, 3))],
    key=["M", "N", "K", "BITS", "TWO_FOUR"],
)(packed_gemm_kernel)
