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
