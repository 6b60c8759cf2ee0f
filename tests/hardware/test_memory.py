import pytest

from autocompress.accounting import model_footprint
from autocompress.hardware.architecture import Architecture
from autocompress.hardware.formats import format_bytes, layer_format
from autocompress.hardware.memory import check_fits, memory_breakdown
from autocompress.errors import AutocompressError
from autocompress.plan import LayerConfig


def test_breakdown_matches_the_accounting_of_the_loaded_model(tiny_loaded):
    arch = Architecture.from_loaded(tiny_loaded)
    configs = {l.name: LayerConfig(bits=b, group_size=32)
               for l, b in zip(tiny_loaded.layers, [2, 3, 4, 8] * 10)}
    ours = memory_breakdown(arch, [configs[l.name] for l in arch.layers], context=256,
                            runtime_overhead=1000)
    reference = model_footprint(tiny_loaded, configs, context=256, runtime_overhead=1000)
    assert ours == reference


def test_kv_bits_and_head_format_change_the_right_parts(tiny_loaded):
    arch = Architecture.from_loaded(tiny_loaded)
    configs = [LayerConfig(bits=4)] * len(arch.layers)
    f16 = memory_breakdown(arch, configs, context=256)
    small = memory_breakdown(arch, configs, context=256, kv_bits=8, head_format="q4")
    assert small.kv_cache * 2 == f16.kv_cache
    assert small.layer_weights == f16.layer_weights
    head = arch.dims.vocab * arch.dims.hidden
    assert f16.other_weights - small.other_weights == \
        format_bytes("f16", *(arch.dims.vocab, arch.dims.hidden)) - \
        format_bytes("q4", arch.dims.vocab, arch.dims.hidden)
    assert format_bytes("f16", 10, 10) == 200 and head > 0


def test_layer_format_names():
    assert layer_format(LayerConfig(bits=16), "bf16") == "bf16"
    assert layer_format(LayerConfig(bits=4, pattern="2:4", sparsity=0.5)) == "q4+2:4"
    assert layer_format(LayerConfig(bits=3, sparsity=0.3)) == "q3+sparse"


def test_check_fits_names_the_parts():
    from autocompress.accounting import Footprint

    fp = Footprint(layer_weights=10**9, other_weights=10**8, kv_cache=10**8, workspace=0,
                   runtime_overhead=0)
    check_fits(fp, 2 * 10**9, "the device")
    with pytest.raises(AutocompressError, match="needs 1.2 GB but the device has 1 GB"):
        check_fits(fp, 10**9, "the device")


def test_held_bytes_follow_the_engine_the_profile_describes():
    from autocompress.accounting import layer_bytes
    from autocompress.hardware.memory import held_layer_bytes
    from tests.hardware.conftest import make_profile

    profile = make_profile(formats={
        "f16": {"efficiency": 1.0},
        "q4": {"efficiency": 0.5, "resident_ratio": 1.4},
        "q3": {"efficiency": 0.5, "held_as": "q4", "resident_ratio": 1.5},
        "q4+2:4": {"efficiency": 0.5, "held_as": "q4", "resident_ratio": 1.4}})
    shape = (96, 256)
    q4_sym = LayerConfig(bits=4, group_size=32, sym=True)
    q4_asym = LayerConfig(bits=4, group_size=32)
    assert held_layer_bytes(*shape, q4_sym, profile) == round(1.4 * layer_bytes(*shape, q4_sym))
    # a widened grid stores its zero points (the symmetric 3-bit zero is not a 4-bit code)
    q3 = LayerConfig(bits=3, group_size=32, sym=True)
    assert held_layer_bytes(*shape, q3, profile) == round(1.5 * layer_bytes(*shape, q4_asym))
    # sparse storage densified: the sparsity buys no bytes on this engine, at any sparsity
    two_four = LayerConfig(bits=4, group_size=32, pattern="2:4", sparsity=0.5)
    assert layer_bytes(*shape, two_four) < layer_bytes(*shape, q4_asym)
    assert held_layer_bytes(*shape, two_four, profile) == round(1.4 * layer_bytes(*shape, q4_asym))
    # formats the profile does not list, and no profile at all: the plan's accounting
    q8 = LayerConfig(bits=8, group_size=32)
    assert held_layer_bytes(*shape, q8, profile) == layer_bytes(*shape, q8)
    assert held_layer_bytes(*shape, q3) == layer_bytes(*shape, q3)
    # low-rank layers keep their factors' shapes
    lowrank = LayerConfig(bits=3, group_size=32, rank_ratio=0.5)
    assert held_layer_bytes(*shape, lowrank, profile) == round(
        1.5 * layer_bytes(*shape, LayerConfig(bits=4, group_size=32, rank_ratio=0.5)))


def test_held_as_must_name_a_dense_format():
    from pydantic import ValidationError

    from tests.hardware.conftest import make_profile

    with pytest.raises(ValidationError, match="dense format"):
        make_profile(formats={"f16": {"efficiency": 1.0},
                              "q4+2:4": {"efficiency": 0.5, "held_as": "q4+2:4"}})
    with pytest.raises(ValidationError, match="resident_ratio"):
        make_profile(formats={"f16": {"efficiency": 1.0},
                              "q4": {"efficiency": 0.5, "resident_ratio": 0}})
