"""Peak resident memory, as the computing commands report it (``--json`` too).

The operating system keeps each process's high-water mark (``getrusage``), so this costs
nothing while the work runs. Ray's level-3 workers are separate processes: each reports its own
mark with its results, and the search reports the largest.
"""

from __future__ import annotations

import sys

from .units import format_size


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size so far; None where the OS does not say."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB elsewhere


def describe(record: dict) -> str:
    """One line from a record with ``peak_rss_bytes`` (and ``worker_peak_rss_bytes``)."""
    main, worker = record.get("peak_rss_bytes"), record.get("worker_peak_rss_bytes")
    if main is None:
        return "peak memory: not reported by this operating system"
    line = f"peak memory: {format_size(main)} resident in this process"
    if worker:
        line += f", {format_size(worker)} in the largest level-3 worker"
    return line


def return_freed_memory() -> None:
    """Hand the memory a stage freed back to the operating system (glibc's ``malloc_trim``).
    Tensors of up to 32 MB come from malloc's heap, which keeps freed pages resident for
    reuse; after a stage that freed gigabytes (the sensitivity table's Fisher diagonal and
    statistics, level 2's memo) those pages would stay counted against the next stage, and
    against Ray's workers that start beside it. A no-op where malloc is not glibc's."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        pass


# Blocks of this size and larger come straight from the operating system (mmap) and go back to
# it when freed; glibc's default raises its threshold with every large block freed, up to 32
# MB, and a process that built and dropped a candidate's layers kept hundreds of MB of freed
# heap (a level-3 worker on SmolLM2: 1.23 GB peak resident against 1.10 GB with 4 MB, at the
# same speed; 1 MB cost 40% more time in page faults).
MMAP_THRESHOLD = 4 << 20


def bound_heap() -> None:
    """Fix malloc's mmap threshold at ``MMAP_THRESHOLD`` for this process (glibc's mallopt;
    a no-op elsewhere). Called where a computing process starts: the command line, and Ray's
    level-2 and level-3 workers."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(name).mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
