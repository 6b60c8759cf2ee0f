"""``QuantLinear``: a linear layer that runs from packed storage, and the choice of its kernels.

Backends (one kernel per packed matrix; a low-rank layer chains two: y = A (B x) + bias):

- ``torch``:  TorchUnpackKernel, every format, on CPU or GPU tensors;
- ``ort``:    ONNX Runtime MatMulNBits, 2/4/8-bit dense weights, CPU only;
- ``triton``: fused dequantize-and-multiply, 2/3/4/8-bit dense and 2:4 weights, on a CUDA GPU
              (or on CPU tensors under ``TRITON_INTERPRET=1``);
- ``auto``:   per matrix, the fastest that runs it: triton on a GPU, ort on the CPU (3/5/6-bit
              codes widened to 4/8 bits, sparse weights densified for it: exact, but more
              memory), else torch.

triton and onnxruntime are optional (the ``gpu`` and ``runtime`` extras): ``auto`` skips a
backend whose package is missing; naming it explicitly says which extra to install.

Float16 (16-bit) dense matrices are plain weights multiplied with torch: exactly (widened to
float32) on the ``torch`` backend, by cpu_kernels.Float16Kernel (float16 GEMV for decode,
widened for prefill) on the others.
A backend named explicitly that has no kernel for a matrix's format is an AutocompressError
naming the layer and the format, raised when the module is built (never inside a kernel).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from ..errors import AutocompressError
from ..optional import available, require
from .cpu_kernels import (
    Float16Kernel,
    OrtMatMulNBitsKernel,
    ort_ready,
    TorchUnpackKernel,
    ort_available,
)
from .packed import PackedLinear, PackedMatrix

BACKENDS = ("auto", "torch", "ort", "triton")


class TritonKernel:
    """Fused dequantize-and-multiply (runtime/triton/kernels.py): GEMV for one row, GEMM above."""

    name = "triton"

    def __init__(self, matrix: PackedMatrix):
        require("triton", "gpu", "the triton backend")
        from .triton.kernels import INTERPRETED, triton_unsupported_reason

        reason = triton_unsupported_reason(matrix)
        if reason:
            raise AutocompressError(f"the triton backend has no kernel for {reason}")
        # on a GPU the kernel reads its own device copy; inputs must be CUDA tensors then
        on_gpu = torch.cuda.is_available() and not INTERPRETED
        self.matrix = matrix.to("cuda") if on_gpu and not matrix.data.is_cuda else matrix

    def nbytes(self) -> int:
        return self.matrix.nbytes()

    def __call__(self, x: Tensor) -> Tensor:
        from .triton.kernels import packed_matmul

        return packed_matmul(x, self.matrix)


def triton_usable() -> bool:
    """Triton kernels run on a CUDA GPU, or anywhere under its interpreter."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return torch.cuda.is_available()


def make_kernel(matrix: PackedMatrix, backend: str = "auto", layer: str = "",
                ort_threads: int | None = None):
    """The kernel of ``backend`` for ``matrix``; ``layer`` names it in errors. ``ort_threads``:
    threads of the ORT sessions (default 1: the calling thread, see cpu_kernels.py)."""
    if backend not in BACKENDS:
        raise AutocompressError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if matrix.bits == 16 and matrix.layout == "dense":
        # "torch" is the exact reference path; the others take the fast float16 GEMV
        return TorchUnpackKernel(matrix) if backend == "torch" else Float16Kernel(matrix)
    where = f" (layer {layer})" if layer else ""
    try:
        if backend == "torch":
            return TorchUnpackKernel(matrix)
        if backend == "ort":
            if not ort_available():
                require("onnxruntime", "runtime", "the ort backend")  # says which extra
            return OrtMatMulNBitsKernel(matrix, threads=ort_threads)
        if backend == "triton":
            require("triton", "gpu", "the triton backend")
            if not triton_usable():
                raise AutocompressError("the triton backend needs a CUDA GPU "
                                        "(or TRITON_INTERPRET=1)")
            return TritonKernel(matrix)
        return _auto_kernel(matrix, ort_threads)
    except AutocompressError as exc:
        raise AutocompressError(f"{exc}{where}; use backend 'auto' or 'torch' for it") from None


def _auto_kernel(matrix: PackedMatrix, ort_threads: int | None):
    if torch.cuda.is_available() and matrix.data.is_cuda:
        if not available("triton"):  # the gpu extra is not installed
            return TorchUnpackKernel(matrix)
        from .triton.kernels import triton_unsupported_reason

        if triton_unsupported_reason(matrix) is None:
            return TritonKernel(matrix)
        return TorchUnpackKernel(matrix)
    ready = ort_ready(matrix, widen=True) if ort_available() else None
    if ready is not None:
        return OrtMatMulNBitsKernel(ready, threads=ort_threads)
    return TorchUnpackKernel(matrix)


class QuantLinear(nn.Module):
    """y = x Wᵀ + b for x of any leading shape, W held packed (a PackedLinear).

    ``keep_packed``: keep the PackedLinear after the kernels are built. None (default) keeps it
    only when a kernel reads it; the ort kernels hold ORT's prepacked copy instead, so keeping
    ours too would double the memory. Saving a model (convert.save_packed) needs it.
    ``ort_threads``: see ``make_kernel``. ``kernels``: prebuilt kernels, one per matrix in the
    order they apply (convert.install_packed shares ORT sessions between layers this way).
    """

    def __init__(self, packed: PackedLinear, bias: Tensor | None = None, backend: str = "auto",
                 name: str = "", keep_packed: bool | None = None, ort_threads: int | None = None,
                 kernels: list | None = None):
        super().__init__()
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.config = packed.config
        self.layer_name = name
        # B first: it is applied first (y = A (B x))
        self.kernels = kernels or [make_kernel(m, backend, name, ort_threads)
                                   for m in reversed(packed.matrices)]
        needed = any(not isinstance(k, OrtMatMulNBitsKernel) for k in self.kernels)
        self.packed = packed if (needed if keep_packed is None else keep_packed) else None
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        # awq: the input divided by the stored scale before the kernels (which see the codes
        # of the scaled weight); low-rank layers have none
        scale = packed.matrices[-1].input_scale
        self.register_buffer("input_scale", None if scale is None else scale.detach().float())

    @property
    def backend(self) -> str:
        return "+".join(k.name for k in self.kernels)

    def nbytes(self) -> int:
        """Bytes this module holds in Python-visible tensors (ORT's own copy excluded)."""
        if self.packed is not None:
            held = self.packed.nbytes()
            return held + sum(k.nbytes() for k in self.kernels
                              if isinstance(k, OrtMatMulNBitsKernel))
        return sum(k.nbytes() for k in self.kernels)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = x.reshape(-1, shape[-1])
        if self.input_scale is not None:
            y = y / self.input_scale.to(y.dtype)
        for kernel in self.kernels:
            y = kernel(y)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.config.short()}, backend={self.backend}")
