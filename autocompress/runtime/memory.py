"""Resident memory as the C heap sees it: what packed layers and their kernels really hold.

glibc's ``mallinfo2`` reports the bytes in use (small blocks + mmapped ones). Unlike the RSS it
falls when memory is freed and does not count pages kept after a free, so the difference
before and after building something is what that thing holds. Tensors and ONNX Runtime's
buffers come from this heap; Python objects mostly do not (pymalloc arenas), which is why the
figure is the tensors' bytes, not the interpreter's bookkeeping.
"""

from __future__ import annotations

import ctypes
import ctypes.util


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def heap_available() -> bool:
    return _LIBC is not None


def heap_in_use() -> int:
    """Bytes of the C heap in use (0 where glibc's mallinfo2 is missing)."""
    if _LIBC is None:
        return 0
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd
