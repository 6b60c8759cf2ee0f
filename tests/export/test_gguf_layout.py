"""GGUF tensor names and q/k row order: the permutation round-trips on any shape, and on the
bundled SmolLM2 GGUF the Hugging Face weights, put in GGUF order, are the file's tensors."""

import numpy as np
import pytest

from autocompress.export.gguf_layout import from_gguf_rows, gguf_name, to_gguf_rows


@pytest.mark.parametrize("hf, gguf", [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
    ("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight"),
    ("model.layers.12.self_attn.k_proj.bias", "blk.12.attn_k.bias"),
    ("model.layers.3.self_attn.o_proj.weight", "blk.3.attn_output.weight"),
    ("model.layers.29.mlp.down_proj.weight", "blk.29.ffn_down.weight"),
    ("model.layers.1.input_layernorm.weight", "blk.1.attn_norm.weight"),
    ("model.layers.1.post_attention_layernorm.weight", "blk.1.ffn_norm.weight"),
])
def test_names(hf, gguf):
    assert gguf_name(hf) == gguf


def test_an_unknown_tensor_has_no_name():
    with pytest.raises(KeyError):
        gguf_name("model.layers.0.mlp.experts.weight")


@pytest.mark.parametrize("name, heads", [("model.layers.0.self_attn.q_proj.weight", 4),
                                         ("model.layers.0.self_attn.k_proj.weight", 2),
                                         ("model.layers.0.self_attn.q_proj.bias", 4)])
def test_the_row_order_round_trips_and_moves_only_q_and_k(name, heads):
    rows = 64
    x = np.arange(rows * (3 if name.endswith("weight") else 1), dtype=np.float32)
    x = x.reshape(rows, -1) if name.endswith("weight") else x
    there = to_gguf_rows(name, x, 4, 2)
    assert not np.array_equal(there, x)
    assert np.array_equal(from_gguf_rows(name, there, 4, 2), x)
    assert sorted(there.reshape(rows, -1)[:, 0]) == sorted(x.reshape(rows, -1)[:, 0])
    v = "model.layers.0.self_attn.v_proj.weight"
    assert to_gguf_rows(v, x, 4, 2) is x


@pytest.mark.integration
def test_the_hf_weights_in_gguf_order_are_the_files_tensors(real_loaded):
    from gguf import GGUFReader

    from autocompress.engines.llamacpp import GGUF_TYPES, dequantize
    from autocompress.model import resolve_alias

    reader = GGUFReader(resolve_alias("smollm2-135m"))
    tensors = {t.name: t for t in reader.tensors}
    config = real_loaded.config
    by_ggml = {t.ggml: t.name for t in GGUF_TYPES.values()}
    checked = 0
    for layer in real_loaded.layers[:14] + real_loaded.layers[-7:]:  # first two, last block
        hf = f"{layer.name}.weight"
        t = tensors[gguf_name(hf)]
        stored = dequantize(np.asarray(t.data), by_ggml[int(t.tensor_type)], layer.shape)
        weight = real_loaded.module(layer.name).weight.detach().numpy()
        ours = to_gguf_rows(hf, weight, config.num_attention_heads, config.num_key_value_heads)
        np.testing.assert_array_equal(ours, stored)
        checked += 1
    assert checked == 21
