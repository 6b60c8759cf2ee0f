"""experiments/peak_memory.py's sampler: the peak it reports is the process tree's, and it
skips the expensive PSS read only when the RSS sum proves no new peak is possible."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))
peak_memory = importlib.import_module("peak_memory")
sys.path.remove(str(EXPERIMENTS))

MB = 2**20
HOLD = f"""
import time
block = bytearray(b"\\x01") * ({200 * MB})  # written, so resident
time.sleep(1.5)
del block
time.sleep(1.5)
"""


def test_the_sampler_finds_a_childs_peak_and_skips_pss_reads_that_cannot_beat_it():
    child = subprocess.Popen([sys.executable, "-c",
                              f"import subprocess, sys; subprocess.run([sys.executable, "
                              f"'-c', {HOLD!r}])"])
    with peak_memory.TreeSampler(child.pid) as sampler:
        child.wait()
    # the grandchild's 200 MB block plus two bare interpreters
    assert 200 * MB <= sampler.peak_pss <= 260 * MB
    assert sampler.peak_rss_sum >= sampler.peak_pss
    assert sampler.most_processes == 2
    # after the block is freed the RSS sum is far below the peak: those ticks read no PSS
    assert sampler.ticks - sampler.pss_reads >= 3
    assert sampler.pss_reads >= 1 and sampler.cpu_s > 0
