import json

import pytest

from autocompress.hardware.architecture import Architecture
from autocompress.hardware.latency import LatencyModel
from autocompress.hardware.measure import ProfileSettings, measure_profile
from autocompress.hardware.profile import profile_to_yaml, read_profile
from autocompress.plan import LayerConfig


@pytest.fixture(scope="module")
def measured(tiny_model_dir):
    arch = Architecture.from_config(json.loads((tiny_model_dir / "config.json").read_text()))
    formats = (LayerConfig(bits=16), LayerConfig(bits=4, group_size=32),
               LayerConfig(bits=3, group_size=32))
    steps = []
    profile = measure_profile(arch, ProfileSettings(name="tiny-box", formats=formats,
                                                    copy_bytes=16 << 20),
                              progress=lambda step, done: steps.append(done))
    return arch, profile, steps


def test_profile_measures_every_format_at_every_shape(measured):
    arch, profile, steps = measured
    shapes = {layer.shape for layer in arch.layers}
    for fmt in ("f16", "q4", "q3"):
        got = {(e.out_features, e.in_features) for e in profile.lookup
               if e.format == fmt and e.out_features != arch.dims.vocab}
        assert got == shapes
    assert {e.format for e in profile.lookup if e.out_features == arch.dims.vocab} >= {"f32"}
    assert profile.measured and profile.memory.bandwidth_gbps > 0.1
    assert profile.overhead.block_us is not None and profile.overhead.block_us >= 0
    assert steps == sorted(steps) and steps[-1] == pytest.approx(1.0)


def test_measured_profile_round_trips_and_predicts_from_its_lookups(measured, tmp_path):
    arch, profile, _ = measured
    path = tmp_path / "tiny-box.yaml"
    path.write_text(profile_to_yaml(profile))
    again = read_profile(path)
    assert again == profile
    est = LatencyModel(again).decode(arch, [LayerConfig(bits=4, group_size=32)] * len(arch.layers),
                                     context=64, head_format="f32")
    assert est.sources == {"lookup": len(arch.layers)}
    measured_sum = sum(e.seconds for layer in arch.layers for e in again.lookup
                       if e.format == "q4" and (e.out_features, e.in_features) == layer.shape)
    assert est.layers_s == pytest.approx(measured_sum)
