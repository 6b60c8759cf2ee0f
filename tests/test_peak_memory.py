import torch

from autocompress.peak_memory import describe, peak_rss_bytes


def test_the_peak_follows_a_large_allocation_in_bytes():
    """A 256 MB tensor, touched, raises the high-water mark by about its size: the unit is
    bytes (getrusage gives KiB on Linux), and the mark is this process's."""
    before = peak_rss_bytes()
    block = torch.ones(64 * 2**20)  # 256 MiB of float32, every page written
    after = peak_rss_bytes()
    assert after - before >= 0.9 * block.numel() * 4 or before > 2 * block.numel() * 4
    assert block.numel() * 4 < after < 64 * 2**30


def test_the_line_names_the_largest_worker_where_there_is_one():
    assert describe({"peak_rss_bytes": 3_400_000_000}) == \
        "peak memory: 3.4 GB resident in this process"
    assert describe({"peak_rss_bytes": 3_400_000_000, "worker_peak_rss_bytes": 1_200_000_000}) \
        .endswith(", 1.2 GB in the largest level-3 worker")
