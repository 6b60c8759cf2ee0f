"""Packed storage and kernels: compressed models that really run small (and, where a kernel
exists, fast).

- packing.py: bit streams of 1..8-bit codes, 2:4 positions, keep bitmaps;
- packed.py: ``PackedMatrix`` / ``PackedLinear``, exactly the bytes accounting.py counts;
- cpu_kernels.py: ONNX Runtime MatMulNBits (2/4/8 bits) and the torch unpack-and-multiply
  fallback; triton/: fused GPU kernels (also run by Triton's interpreter on CPU);
- modules.py: ``QuantLinear`` and the choice of kernel per backend;
- convert.py: ``pack_model``, ``save_packed`` / ``load_packed``, ``apply_packed`` (the CLI's
  ``apply --packed``).

Triton is imported only when its backend is used.
"""

from .convert import (
    PackedModel,
    apply_packed,
    load_packed,
    pack_layers,
    pack_model,
    quant_linears,
    save_packed,
)
from .modules import BACKENDS, QuantLinear, make_kernel
from .packed import PackedLinear, PackedMatrix

__all__ = [
    "BACKENDS",
    "PackedLinear",
    "PackedMatrix",
    "PackedModel",
    "QuantLinear",
    "apply_packed",
    "load_packed",
    "make_kernel",
    "pack_layers",
    "pack_model",
    "quant_linears",
    "save_packed",
]
