"""Weights that stay on disk: a stage done with some of the model's tensors hands their pages
back to the operating system.

transformers maps a safetensors checkpoint into memory (copy-on-write) instead of reading it:
every weight of a model ``load_model`` loads on the CPU is a view of its file, paged in when
first read. Once read, the pages stay counted in the process's resident memory, so a stage that
reads every weight once (a forward pass, the sensitivity table) ends with the whole model
resident, and a plan compressed in place holds the candidate's new weights *beside* the
originals it replaced. ``release`` drops such pages (``madvise(MADV_DONTNEED)``): they leave
the process's resident set and are read in again from the file (from the page cache, as a
rule: no disk access) when next used. That is the CPU's form of "sequential onloading": a
block's weights are resident while it computes, not for the whole run.

Only pages that hold a file's bytes are released: the kernel's page map (/proc/self/pagemap)
says of every resident page whether it is a page of a file (or of shared memory, whose
contents also outlive the mapping); a range with any other resident page (anonymous memory: a
tensor of the process's own, or a weight written after loading, which copy-on-write made the
process's own) is left alone, so dropping never loses a byte. Elsewhere than Linux ``release``
does nothing.
"""

from __future__ import annotations

import mmap
import sys
from contextlib import contextmanager
from typing import Iterable, Iterator

import numpy as np
import torch

MADV_DONTNEED = 4
PAGE = mmap.PAGESIZE
_PRESENT, _SWAPPED, _FILE_OR_SHARED = np.uint64(1 << 63), np.uint64(1 << 62), np.uint64(1 << 61)
_LIBC = None


def _page_entries(first: int, last: int) -> np.ndarray:
    """The kernel's page-map entries of the pages in [first, last)."""
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first // PAGE * 8)
        return np.frombuffer(pagemap.read((last - first) // PAGE * 8), dtype=np.uint64)


def _pages_hold_a_file(first: int, last: int) -> bool:
    """Whether every page in [first, last) that is resident is a file's (or shared memory's),
    and none is swapped out: dropping them loses nothing."""
    entries = _page_entries(first, last)
    own = ((entries & _PRESENT) != 0) & ((entries & _FILE_OR_SHARED) == 0)
    return not (own.any() or ((entries & _SWAPPED) != 0).any())


def _madvise(first: int, length: int) -> bool:
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        _LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _LIBC.madvise(first, length, MADV_DONTNEED) == 0


def _whole_pages(tensor: torch.Tensor) -> tuple[int, int] | None:
    """The page-aligned part of a contiguous CPU tensor's own bytes (a checkpoint's tensors
    may share one storage: only this tensor's pages are concerned)."""
    if tensor is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return None
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // PAGE) * PAGE, end // PAGE * PAGE
    return (first, last) if last > first else None


def release(tensors: Iterable[torch.Tensor]) -> int:
    """Drop the resident pages of ``tensors`` that are views of a mapped file (the whole
    pages inside each tensor's bytes); returns the bytes handed back. The tensors stay valid:
    reading them pages the file's bytes in again. Anything else is left as it is."""
    if not sys.platform.startswith("linux"):
        return 0
    released = 0
    for tensor in tensors:
        pages = _whole_pages(tensor)
        if pages is None:
            continue
        first, last = pages
        try:
            if _pages_hold_a_file(first, last) and _madvise(first, last - first):
                released += last - first
        except OSError:  # no /proc (a restricted container): keep everything
            return released
    return released


def release_module(module: torch.nn.Module) -> int:
    """``release`` every parameter and buffer of ``module``."""
    return release([*module.parameters(), *module.buffers()])


def resident_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of ``tensors``' whole pages that are in the process's memory now (Linux; 0
    elsewhere): what a forward pass left behind."""
    if not sys.platform.startswith("linux"):
        return 0
    total = 0
    for tensor in tensors:
        pages = _whole_pages(tensor)
        if pages is None:
            continue
        total += int(((_page_entries(*pages) & _PRESENT) != 0).sum()) * PAGE
    return total


def _streamed_parts(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The parts of a causal LM a forward pass reads one after the other: its decoder blocks,
    input embedding and head (the final norm is a few KB)."""
    parts = []
    blocks = getattr(getattr(model, "model", None), "layers", None)
    if isinstance(blocks, torch.nn.ModuleList):
        parts.extend(blocks)
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        part = getattr(model, getter, lambda: None)()
        if isinstance(part, torch.nn.Module):
            parts.append(part)
    return parts


@contextmanager
def streamed(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """While active, each block (and the embedding and head) of ``model`` hands its file pages
    back as soon as its forward is done: a forward pass holds one block's weights, not the
    whole model's, and ends holding none (a 1.5B model in float32 read whole is 7 GB of
    resident pages). Weights that are not file views (a plan compressed in place, a GPU's) are
    left as they are."""
    def hand_back(module, _inputs, _output) -> None:  # None: the output is left as it is
        release_module(module)

    parts = _streamed_parts(model) if sys.platform.startswith("linux") else []
    handles = [part.register_forward_hook(hand_back) for part in parts]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def file_backed(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s bytes lie in a mapping of a file (/proc/self/maps) and none of its
    resident pages is the process's own: what ``release`` can hand back."""
    pages = _whole_pages(tensor)
    if pages is None or not sys.platform.startswith("linux"):
        return False
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= pages[0] and pages[1] <= high:
                return len(fields) > 5 and fields[5].startswith("/") \
                    and _pages_hold_a_file(*pages)
    return False
