import json
from pathlib import Path

import pytest

from autocompress.accounting import layer_bytes
from autocompress.hardware.architecture import Architecture, read_config
from autocompress.hardware.latency import LatencyModel
from autocompress.hardware.profile import available_profiles, read_profile
from autocompress.plan import LayerConfig

from .conftest import make_profile

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"
Q4 = LayerConfig(bits=4, group_size=64)


def test_roofline_is_bytes_over_bandwidth_times_efficiency(profile):
    model = LatencyModel(profile)  # 1 GB/s, q4 at 50% efficiency, no launch cost
    nbytes = layer_bytes(256, 512, Q4)
    seconds, source = model.layer_seconds(256, 512, Q4)
    activations = (256 + 512) * 2
    assert source == "roofline"
    assert seconds == pytest.approx((nbytes + activations) / (1e9 * 0.5), rel=1e-9)


def test_format_without_fast_kernel_uses_the_fallback(profile):
    cfg = LayerConfig(bits=3, group_size=64)
    seconds, source = LatencyModel(profile).layer_seconds(256, 512, cfg)
    assert source == "fallback"
    assert seconds == pytest.approx((layer_bytes(256, 512, cfg) + 768 * 2) / (1e9 * 0.25))


def test_compute_bound_prefill_and_2_4_halving():
    profile = make_profile(formats={"f16": {"efficiency": 1.0}, "q4": {"efficiency": 1.0},
                                    "q4+2:4": {"efficiency": 1.0, "compute_efficiency": 1.0}},
                           memory__bandwidth_gbps=1e6)  # memory never binds
    model = LatencyModel(profile)
    dense = LayerConfig(bits=4, group_size=64)
    sparse = LayerConfig(bits=4, group_size=64, sparsity=0.5, pattern="2:4")
    t_sparse, _ = model.layer_seconds(1024, 1024, sparse, tokens=512)
    assert t_sparse == pytest.approx(2 * 512 * 1024 * 1024 / 2 / 1e12, rel=1e-3)
    t_dense, _ = model.layer_seconds(1024, 1024, dense, tokens=512)
    assert t_dense == pytest.approx(2 * 512 * 1024 * 1024 / (1e12 * 0.5), rel=1e-3)


def test_lookup_wins_and_scales_with_the_group_bytes():
    entry = {"format": "q4", "group_size": 64, "out_features": 256, "in_features": 512,
             "tokens": 1, "seconds": 1e-3}
    model = LatencyModel(make_profile(lookup=[entry], overhead={"launch_us": 100.0}))
    seconds, source = model.layer_seconds(256, 512, Q4)
    assert source == "lookup" and seconds == pytest.approx(1e-3)
    g32 = LayerConfig(bits=4, group_size=32)
    scaled, _ = model.layer_seconds(256, 512, g32)
    ratio = layer_bytes(256, 512, g32) / layer_bytes(256, 512, Q4)
    assert scaled == pytest.approx(1e-4 + 0.9e-3 * ratio)


def test_low_rank_layer_costs_two_smaller_matmuls(profile):
    model = LatencyModel(profile)
    full, _ = model.layer_seconds(1024, 1024, Q4)
    low, _ = model.layer_seconds(1024, 1024, LayerConfig(bits=4, group_size=64, rank_ratio=0.25))
    assert 0.2 < low / full < 0.3


def test_decode_adds_layers_head_kv_and_block_work(profile):
    arch = read_config(CONFIGS / "llama-2-7b.json")
    model = LatencyModel(make_profile(overhead={"launch_us": 0.0, "block_us": 100.0}))
    est = model.decode(arch, [Q4] * len(arch.layers), context=1000)
    assert est.overhead_s == pytest.approx(32 * 100e-6)
    kv_bytes = 2 * 32 * 32 * 128 * 1000 * 2
    assert est.kv_s == pytest.approx(kv_bytes / 1e9)
    assert est.seconds_per_token == pytest.approx(est.layers_s + est.head_s + est.kv_s
                                                  + est.overhead_s)
    assert est.layers_s == pytest.approx(sum(est.per_layer_s.values()))
    # at equal efficiency, more bits read more bytes: slower; at the synthetic profile's
    # half-efficiency q4 kernel, q8 wins: the profile's kernels matter, not only the bytes
    q8 = model.decode(arch, [LayerConfig(bits=8, group_size=64)] * len(arch.layers), 1000)
    assert q8.tokens_per_s > est.tokens_per_s
    even = LatencyModel(make_profile(formats={"f16": {"efficiency": 1.0},
                                              "q4": {"efficiency": 1.0},
                                              "q8": {"efficiency": 1.0}}))
    assert even.decode(arch, [LayerConfig(bits=8, group_size=64)] * len(arch.layers), 1000) \
        .tokens_per_s < even.decode(arch, [Q4] * len(arch.layers), 1000).tokens_per_s


@pytest.mark.parametrize("name", [n for n in available_profiles()
                                  if read_profile(available_profiles()[n]).published])
def test_published_decode_speeds_are_predicted_within_25_percent(name):
    """The profiles' efficiencies are one assumption per device family, not fitted per figure;
    this checks the roofline against what engines measured on the devices."""
    profile = read_profile(available_profiles()[name])
    model = LatencyModel(profile)
    for run in profile.published:
        arch = read_config(CONFIGS / run.config)
        cfg = LayerConfig(bits=run.bits, group_size=run.group_size, sym=run.sym)
        est = model.decode(arch, [cfg] * len(arch.layers), run.context, run.head_format)
        assert est.tokens_per_s == pytest.approx(run.tokens_per_s, rel=0.25), run.model


def test_config_architecture_matches_the_loaded_model(tiny_loaded, tiny_model_dir):
    from_config = Architecture.from_config(json.loads((tiny_model_dir / "config.json").read_text()))
    loaded = Architecture.from_loaded(tiny_loaded)
    assert [(l.name, l.shape) for l in from_config.layers] == \
        [(l.name, l.shape) for l in loaded.layers]
    assert from_config.other_params == loaded.other_params
    assert from_config.dims == loaded.dims


def test_bytes_read_per_token_are_those_the_engine_holds(tiny_loaded):
    from autocompress.accounting import layer_bytes
    from autocompress.hardware.architecture import Architecture
    from autocompress.hardware.latency import LatencyModel
    from autocompress.plan import LayerConfig
    from tests.hardware.conftest import make_profile

    arch = Architecture.from_loaded(tiny_loaded)
    q3 = [LayerConfig(bits=3, group_size=32)] * len(arch.layers)
    plain = make_profile(formats={"f16": {"efficiency": 1.0}, "q3": {"efficiency": 0.5}})
    widening = make_profile(formats={"f16": {"efficiency": 1.0},
                                     "q3": {"efficiency": 0.5, "held_as": "q4",
                                            "resident_ratio": 1.5}})
    as_planned = LatencyModel(plain).decode(arch, q3, context=64)
    as_held = LatencyModel(widening).decode(arch, q3, context=64)
    planned = sum(layer_bytes(*l.shape, c) for l, c in zip(arch.layers, q3))
    held = sum(round(1.5 * layer_bytes(*l.shape, LayerConfig(bits=4, group_size=32)))
               for l in arch.layers)
    assert as_held.bytes_per_token - as_planned.bytes_per_token == held - planned
