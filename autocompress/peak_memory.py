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
