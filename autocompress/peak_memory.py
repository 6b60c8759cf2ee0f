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
