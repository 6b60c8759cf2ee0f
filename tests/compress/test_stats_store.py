"""Calibration statistics on disk: what is written is what is read, a sweep block by block
takes what one pass takes, and another run's statistics are never mixed in."""

import pytest
import torch

from autocompress.compress.calibration import collect_stats
from autocompress.compress.stats_store import StatsStore


def _windows(tiny_loaded, n=3, length=24):
    return torch.randint(0, tiny_loaded.model.config.vocab_size, (n, length),
                         generator=torch.Generator().manual_seed(5))


def _same(a, b) -> bool:
    return (a.n_samples == b.n_samples and torch.equal(a.act_norm, b.act_norm)
            and (a.hessian is None) == (b.hessian is None)
            and (a.hessian is None or torch.equal(a.hessian, b.hessian))
            and (a.mean_square is None) == (b.mean_square is None)
            and (a.mean_square is None or torch.equal(a.mean_square, b.mean_square)))


def test_a_filled_store_reads_back_what_one_pass_collects(tiny_loaded, tmp_path):
    layers = tiny_loaded.layers
    hessian = {layers[0].name, layers[-1].name}  # the rest keep only the diagonal
    windows = _windows(tiny_loaded)
    expected = collect_stats(tiny_loaded.model, layers, windows, progress=False,
                             hessian_layers=hessian)
    store = StatsStore(tmp_path / "stats", layers, {"k": 1}, hessian)
    assert not store.complete and len(store) == 0
    store.fill(tiny_loaded.model, windows, progress=False)
    assert store.complete and len(store) == len(layers)
    for layer in layers:
        assert _same(store[layer.name], expected[layer.name]), layer.name
    assert store[layers[1].name].hessian is not None  # k reads q's input: one file, full H
    assert store[layers[4].name].hessian is None


def test_a_reader_sees_the_writer_s_files_and_another_key_empties_the_directory(tiny_loaded,
                                                                             tmp_path):
    layers = tiny_loaded.layers
    store = StatsStore(tmp_path / "stats", layers, {"k": 1}, None)
    store.fill(tiny_loaded.model, _windows(tiny_loaded), progress=False)
    reader = StatsStore.reader(tmp_path / "stats", layers)
    assert reader.complete and reader.hessian_layers is None
    assert _same(reader[layers[2].name], store[layers[2].name])
    again = StatsStore(tmp_path / "stats", layers, {"k": 1}, None)  # same key: kept
    assert again.complete
    other = StatsStore(tmp_path / "stats", layers, {"k": 2}, None)  # other windows, say
    assert not other.complete and len(other) == 0
    with pytest.raises(KeyError):
        other[layers[0].name]


def test_a_temporary_store_goes_with_close(tiny_loaded):
    store = StatsStore(None, tiny_loaded.layers, {}, None)
    directory = store.directory
    store.fill(tiny_loaded.model, _windows(tiny_loaded), progress=False)
    assert directory.is_dir()
    store.close()
    assert not directory.exists()
