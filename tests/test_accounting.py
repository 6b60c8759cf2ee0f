import math

import pytest

from autocompress.accounting import (ModelDims, footprint, kv_cache_bytes, layer_bytes,
                                     matrix_bits, rank_for)
from autocompress.plan import LayerConfig


def test_fp16_dense():
    assert layer_bytes(576, 576, LayerConfig(bits=16)) == 576 * 576 * 2


@pytest.mark.parametrize("bits, group, sym, per_group_bits", [
    (4, 64, False, 32), (3, 32, True, 16), (2, 128, False, 32), (8, -1, True, 16),
])
def test_quantized_bytes(bits, group, sym, per_group_bits):
    out, inp = 1536, 576
    groups = 1 if group == -1 else math.ceil(inp / group)
    expected_bits = out * inp * bits + out * groups * per_group_bits
    assert layer_bytes(out, inp, LayerConfig(bits=bits, group_size=group, sym=sym)) == \
        math.ceil(expected_bits / 8)


def test_ragged_group_counts_partial_group():
    # 576 = 4 x 128 + 64: five groups per row
    assert matrix_bits(10, 576, LayerConfig(bits=4, group_size=128)) == 10 * 576 * 4 + 10 * 5 * 32


def test_sparse_bytes():
    cfg = LayerConfig(bits=16, sparsity=0.5, prune_method="magnitude")
    assert matrix_bits(8, 64, cfg) == 8 * 32 * 16 + 8 * 64  # values + bitmap
    cfg24 = LayerConfig(bits=4, pattern="2:4", sparsity=0.5)
    assert matrix_bits(8, 64, cfg24) == 8 * 32 * 4 + 8 * 1 * 32 + 8 * 32 * 2


def test_low_rank_bytes_are_the_factors():
    r = rank_for(576, 1536, 0.5)
    assert r == math.floor(0.5 * 576 * 1536 / (576 + 1536))
    cfg = LayerConfig(bits=16, rank_ratio=0.5)
    assert layer_bytes(576, 1536, cfg) == 2 * r * (576 + 1536)
    assert layer_bytes(576, 1536, cfg) <= 0.5 * layer_bytes(576, 1536, LayerConfig(bits=16))


def test_kv_cache_smollm2():
    dims = ModelDims(n_blocks=30, hidden=576, intermediate=1536, n_heads=9, n_kv_heads=3,
                     head_dim=64, vocab=49152)
    assert kv_cache_bytes(dims, context=2048, batch=1) == 2 * 30 * 3 * 64 * 2048 * 2
    assert kv_cache_bytes(dims, context=2048, batch=4) == 4 * kv_cache_bytes(dims, 2048, 1)
    fp = footprint([(576, 576)], [LayerConfig(bits=4)], other_params=1000, dims=dims)
    assert fp.total == fp.layer_weights + 2000 + fp.kv_cache + fp.workspace


@pytest.mark.parametrize("name, n, row_bytes", [
    ("q4_k", 1536, 1536 // 256 * 144),  # whole super-blocks: 4.5 bits a weight
    ("q4_k", 576, 576 // 32 * 22),  # 576 is not a multiple of 256: llama.cpp stores q5_0
    ("q6_k", 576, 576 // 32 * 34),  # -> q8_0
    ("iq4_xs", 768, 768 // 256 * 136),
    ("q8_0", 64, 2 * 34),
    ("bf16", 100, 200),
])
def test_gguf_bytes_are_whole_blocks_of_the_type_llama_cpp_stores(name, n, row_bytes):
    assert layer_bytes(10, n, LayerConfig(gguf=name)) == 10 * row_bytes


def test_model_footprint_counts_the_embedding_at_its_gguf_type(tiny_loaded):
    from autocompress.accounting import model_footprint

    configs = {layer.name: LayerConfig(bits=16) for layer in tiny_loaded.layers}
    plain = model_footprint(tiny_loaded, configs)
    vocab, hidden = tiny_loaded.model.get_input_embeddings().weight.shape
    squeezed = model_footprint(tiny_loaded, {**configs,
                                             "model.embed_tokens": LayerConfig(gguf="q8_0")})
    # hidden 64 = two q8_0 blocks per row, 34 bytes each, instead of 128 bytes of float16
    assert plain.other_weights - squeezed.other_weights == vocab * (2 * hidden - 2 * 34)
    assert squeezed.layer_weights == plain.layer_weights
