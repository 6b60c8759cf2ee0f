"""Peak memory of one autocompress command, its Ray workers included: the baseline the scale
work is measured against. Writes experiments/results/peak_memory.json (entry LABEL).

The command runs as a child process; every 0.25 s the sampler sums, over it and all its
descendants (Ray's GCS, raylet and workers are descendants of the driver), the resident set
sizes and, for the peak that counts, the proportional set sizes (PSS: a page shared by k
processes counts 1/k in each, so shared libraries and Ray's object store are not counted once
per process). The peak of the PSS sum is the machine memory the command needed;
``largest_process`` is the peak of the largest single process (what /usr/bin/time reports).

Reading PSS makes the kernel walk every page of every process (smaps_rollup), which on the
1.5B search cost about a fifth of a core. So RSS (a counter, cheap) is read every tick and PSS
only on ticks where it could make a new peak: a process's PSS never exceeds its RSS, so while
the RSS sum is at or below the PSS peak so far, the PSS sum is too, and skipping that read
changes no peak. The sampler's own CPU time is reported (``cpu_s``).

    .venv/bin/python experiments/peak_memory.py LABEL -- autocompress search ...
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ResultFile, machine  # noqa: E402

INTERVAL_S = 0.25


class TreeSampler:
    """Peak PSS and RSS, summed over a process and its descendants, sampled in a thread."""

    def __init__(self, pid: int):
        import psutil

        self._root = psutil.Process(pid)
        self.peak_pss = self.peak_rss_sum = self.largest_process = self.most_processes = 0
        self.cpu_s = 0.0  # the sampling thread's own CPU time, user and system
        self.ticks = self.pss_reads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        started = time.thread_time()
        while not self._stop.is_set():
            try:
                procs = [self._root, *self._root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            live, rss = [], 0
            for proc in procs:
                try:
                    proc_rss = proc.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                live.append(proc)
                rss += proc_rss
                self.largest_process = max(self.largest_process, proc_rss)
            self.peak_rss_sum = max(self.peak_rss_sum, rss)
            self.most_processes = max(self.most_processes, len(live))
            if rss > self.peak_pss:  # else the PSS sum cannot beat its peak either
                self.peak_pss = max(self.peak_pss, self._pss_sum(live))
                self.pss_reads += 1
            self.ticks += 1
            self.cpu_s = time.thread_time() - started
            self._stop.wait(INTERVAL_S)

    @staticmethod
    def _pss_sum(procs) -> int:
        import psutil

        total = 0
        for proc in procs:
            try:
                total += proc.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("label", help="entry key, e.g. search-smollm2-demo")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    results = ResultFile("peak_memory.json", {
        "sampler": f"PSS and RSS summed over the command and its descendants every "
                   f"{INTERVAL_S} s (psutil), peak of the sum", "machine": machine()})
    start = time.time()
    proc = subprocess.Popen(command)
    with TreeSampler(proc.pid) as sampler:
        code = proc.wait()
    wall = time.time() - start
    if code != 0:
        raise SystemExit(f"the command exited {code}; nothing was recorded")
    results.put(args.label, {"command": shlex.join(command), "peak_pss_bytes": sampler.peak_pss,
                             "peak_rss_sum_bytes": sampler.peak_rss_sum,
                             "largest_process_rss_bytes": sampler.largest_process,
                             "processes": sampler.most_processes, "wall_s": round(wall, 1),
                             "sampler_cpu_s": round(sampler.cpu_s, 1)})
    print(f"{args.label}: peak {sampler.peak_pss / 2**30:.2f} GiB PSS "
          f"({sampler.peak_rss_sum / 2**30:.2f} GiB RSS summed over up to "
          f"{sampler.most_processes} processes), {wall:.0f} s")


if __name__ == "__main__":
    main()
