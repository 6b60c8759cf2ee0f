"""Triton kernels for packed weights (GPU, or CPU under TRITON_INTERPRET=1).

Import ``autocompress.runtime.triton.kernels`` explicitly: this package's import pulls in
nothing, so importing the runtime never needs triton. Set TRITON_INTERPRET=1 *before* that
import to run the kernels on CPU tensors (``@triton.jit`` reads it when the kernels are defined).
"""
