"""Learned rounding keeps each tuned block on disk: an interrupted build resumes after its last
tuned block, and a later build of the same plan on the same windows tunes nothing."""

import pytest
import torch

from autocompress.compress import signround
from autocompress.compress.apply import compress_model
from autocompress.plan import LayerConfig, uniform_plan


def _windows(loaded, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, loaded.model.config.vocab_size, (4, 32), generator=g)


def _plan(loaded):
    return uniform_plan(loaded.identity, LayerConfig(bits=2, group_size=32, method="signround"))


def _build(loaded, windows, plan=None):
    """Every block linear's (codes, scale, zero) as the build installed them."""
    layers = {}
    compress_model(loaded, plan or _plan(loaded), windows, progress=False,
                   on_layer=lambda layer, cfg, c: layers.update({layer.name: c.quantized[0]}))
    return {name: (qw.q, qw.scale, qw.zero) for name, qw in layers.items()}


def _same(a, b):
    return a.keys() == b.keys() and all(
        all(torch.equal(x, y) for x, y in zip(a[name], b[name])) for name in a)


@pytest.fixture
def tunes(monkeypatch):
    """Counts SignRound.tune calls; ``tunes.fail_at = k`` interrupts the k-th one."""
    original = signround.SignRound.tune
    state = type("Tunes", (), {"calls": 0, "fail_at": None})()

    def counted(self, *args, **kwargs):
        state.calls += 1
        if state.calls == state.fail_at:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(signround.SignRound, "tune", counted)
    return state


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "rounding"


def test_a_second_build_reads_every_block_and_holds_the_same_codes(tiny_loaded, tunes,
                                                                    fresh_cache):
    windows = _windows(tiny_loaded)
    first = _build(tiny_loaded, windows)
    blocks = tunes.calls
    assert blocks == len({layer.block for layer in tiny_loaded.layers}) > 1
    assert len(list(fresh_cache.glob("*/block-*.safetensors"))) == blocks
    assert _same(_build(tiny_loaded, windows), first)
    assert tunes.calls == blocks  # nothing tuned the second time


def test_an_interrupted_build_resumes_after_its_last_tuned_block(tiny_loaded, tunes,
                                                                 fresh_cache, tmp_path,
                                                                 monkeypatch):
    windows = _windows(tiny_loaded)
    tunes.fail_at = 2
    with pytest.raises(KeyboardInterrupt):
        _build(tiny_loaded, windows)
    assert len(list(fresh_cache.glob("*/block-*.safetensors"))) == 1
    tunes.fail_at, tunes.calls = None, 0
    resumed = _build(tiny_loaded, windows)
    blocks = len({layer.block for layer in tiny_loaded.layers})
    assert tunes.calls == blocks - 1
    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path / "other"))
    assert _same(resumed, _build(tiny_loaded, windows))  # as a build never interrupted


def test_other_windows_or_another_plan_tune_again(tiny_loaded, tunes, fresh_cache):
    _build(tiny_loaded, _windows(tiny_loaded))
    blocks = tunes.calls
    _build(tiny_loaded, _windows(tiny_loaded, seed=2))
    assert tunes.calls == 2 * blocks
    # the same signround layers, one other layer changed: every later block's inputs differ
    configs = _plan(tiny_loaded).resolve_model(tiny_loaded)
    configs[tiny_loaded.layers[0].name] = LayerConfig(bits=4, group_size=32)
    _build(tiny_loaded, _windows(tiny_loaded), configs)
    assert tunes.calls == 3 * blocks


def test_an_unreadable_entry_is_tuned_again_with_a_warning(tiny_loaded, tunes, fresh_cache):
    windows = _windows(tiny_loaded)
    first = _build(tiny_loaded, windows)
    blocks = tunes.calls
    entry = sorted(fresh_cache.glob("*/block-*.safetensors"))[0]
    entry.write_bytes(b"not safetensors")
    with pytest.warns(UserWarning, match="unreadable"):
        again = _build(tiny_loaded, windows)
    assert tunes.calls == blocks + 1
    assert _same(again, first)
