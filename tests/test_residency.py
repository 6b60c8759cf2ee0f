"""Weights that stay on disk: pages of the model's mapped file handed back and read in again."""

from __future__ import annotations

import sys

import pytest
import torch

from autocompress.residency import file_backed, release

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="madvise and /proc/self/smaps")


def _resident_bytes() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Rss line")


def _mapped(path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` as views of a safetensors file mapped into memory, as transformers loads a
    checkpoint (safe_open maps the file; load_file would copy)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    with safe_open(str(path), "pt") as f:
        out = {name: f.get_tensor(name) for name in tensors}
    assert all(file_backed(t) for t in out.values())
    return out


def test_released_pages_leave_memory_and_read_back_the_file_s_values(tmp_path):
    weight = torch.randn(4096, 1024)  # 16 MiB
    mapped = _mapped(tmp_path / "w.safetensors", {"w": weight})["w"]
    assert torch.equal(mapped, weight)  # every page read in
    before = _resident_bytes()
    freed = release([mapped])
    assert freed >= weight.numel() * 4 - 2 * 4096  # all but the partial pages at the ends
    assert _resident_bytes() < before - 12 * 2**20
    assert torch.equal(mapped, weight)  # read in again from the file


def test_memory_that_is_not_an_unwritten_file_view_is_never_released(tmp_path):
    anonymous = torch.randn(1024, 1024)
    copy = anonymous.clone()
    assert not file_backed(anonymous)
    assert release([anonymous]) == 0 and torch.equal(anonymous, copy)
    mapped = _mapped(tmp_path / "w.safetensors", {"w": copy})["w"]
    mapped.sum()  # every page read in: pages of the file
    mapped[512, 0] = 7.0  # copy-on-write: this page is now the process's own
    assert not file_backed(mapped)
    assert release([mapped]) == 0
    assert release([mapped[:256]]) > 0  # pages before the written one are the file's still
    assert mapped[512, 0] == 7.0 and torch.equal(mapped[:512], copy[:512])


def test_only_the_tensor_s_own_pages_go_when_a_file_s_tensors_share_one_mapping(tmp_path):
    tensors = _mapped(tmp_path / "w.safetensors",
                      {"a": torch.randn(1024, 1024), "b": torch.randn(1024, 1024)})
    for t in tensors.values():
        t.sum()
    freed = release([tensors["a"]])
    assert (4 << 20) - 2 * 4096 <= freed <= 4 << 20  # a's 4 MiB, not the whole file


def test_a_loaded_model_s_weights_are_views_of_its_file(tiny_loaded):
    """What the meters rely on to hold a plan's weights instead of the originals beside
    them: load_model gives weights that are unwritten views of the checkpoint."""
    assert all(file_backed(tiny_loaded.module(layer.name).weight) for layer in tiny_loaded.layers)


# the kernel maps up to 64 KB of a file's cached pages around each page a read faults in
# ("fault-around"): a released tensor's pages next to ones being read come back that way, a few
# such windows at each end of a tensor (a tenth of this test's blocks, nothing of a real one's)
FAULT_AROUND = 4 * 64 * 1024


def test_a_forward_pass_holds_one_block_s_weights_at_a_time(tmp_path):
    """Sequential onloading on the CPU: while block i runs, the blocks before it have handed
    their pages back, and after the pass no block, embedding or head is resident (the 1.5B
    model's reference pass held all 7 GB of its float32 file at once before this)."""
    from autocompress.evaluate import log_probs
    from autocompress.model import load_model
    from autocompress.residency import resident_bytes
    from tests.conftest import make_tiny_model_dir

    directory = make_tiny_model_dir(tmp_path / "model", n_layers=3, hidden_size=256,
                                    intermediate_size=512)  # 2.4 MB per block
    model = load_model(str(directory)).model
    blocks = list(model.model.layers)
    per_block = [list(b.parameters()) for b in blocks]
    parts = per_block + [[model.get_input_embeddings().weight]]  # the head is tied to it
    held_before: list[int] = []
    handles = [block.register_forward_pre_hook(
        lambda _m, _i, index=index: held_before.append(
            sum(resident_bytes(per_block[j]) for j in range(index))))
        for index, block in enumerate(blocks)]
    window = torch.arange(16)
    try:
        expected = log_probs(model, window)
        held_before.clear()
        for part in parts:
            sum(p.sum() for p in part)  # every weight read in: resident before the pass
        assert min(resident_bytes(part) for part in per_block) > 2 * 2**20
        again = log_probs(model, window)
    finally:
        for handle in handles:
            handle.remove()
    assert len(held_before) == 3
    assert all(held <= FAULT_AROUND * index for index, held in enumerate(held_before)), \
        held_before
    assert all(resident_bytes(part) <= FAULT_AROUND for part in parts), \
        [resident_bytes(part) for part in parts]
    assert torch.equal(again, expected)  # read back from the file: the same weights
