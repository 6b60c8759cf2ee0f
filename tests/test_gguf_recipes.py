"""llama.cpp's recipes, as autocompress writes them, against files that llama-quantize made:
every tensor of Qwen2.5-Coder-1.5B's Q4_K_M file and of the bundled SmolLM2 Q4_1 file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autocompress.errors import AutocompressError
from autocompress.gguf_recipes import (RECIPES, Model, quantizable, recipe_configs,
                                       recipe_types, use_more_bits)

FIXTURE = Path(__file__).parent / "fixtures" / "qwen2.5-coder-1.5b-q4_k_m.json"


def _from_table(table):
    tensors = [t for t in table["tensors"] if quantizable(t["name"], t["shape"])]
    meta = table["metadata"]
    arch = meta["general.architecture"]
    model = Model(n_layer=meta[f"{arch}.block_count"], n_head=meta[f"{arch}.attention.head_count"],
                  n_head_kv=meta[f"{arch}.attention.head_count_kv"],
                  tied_embeddings=not any(t["name"] == "output.weight" for t in tensors))
    return [(t["name"], t["shape"][0]) for t in tensors], {t["name"]: t["type"] for t in tensors}, \
        model


def test_q4_k_m_gives_every_tensor_of_llama_quantizes_file_its_type():
    """Which 14 of 28 blocks get q6_k for attn_v and ffn_down depends on llama.cpp counting
    them in name order (blk.10 before blk.2): counted by block number, 8 of the 14 would be
    other blocks."""
    table = json.loads(FIXTURE.read_text())
    assert table["ftype"] == "Q4_K_M" and table["metadata"]["general.file_type"] == 15
    rows, expected, model = _from_table(table)
    assert len(expected) == 198 and not model.tied_embeddings
    assert recipe_types("Q4_K_M", rows, model) == expected
    boosted = sorted(int(n.split(".")[1]) for n, t in expected.items()
                     if t == "q6_k" and "attn_v" in n)
    assert boosted == [0, 1, 5, 6, 7, 8, 9, 10, 13, 16, 19, 21, 24, 27]


def test_the_bundled_smollm2_file_is_llama_cpps_q4_1():
    """A tied embedding takes the head's rule: q6_k, whose 256-blocks do not divide SmolLM2's
    576-wide rows, so llama.cpp's fallback q8_0: what the file holds."""
    pytest.importorskip("gguf")
    from gguf import GGUFReader

    from autocompress.gguf_types import GGUF_BY_GGML
    from autocompress.model import resolve_alias

    try:
        reader = GGUFReader(resolve_alias("smollm2-135m"))
    except AutocompressError as exc:
        pytest.skip(str(exc))
    fields = reader.fields
    table = {"metadata": {k: fields[k].contents() for k in (
        "general.architecture", "llama.block_count", "llama.attention.head_count",
        "llama.attention.head_count_kv")},
        "tensors": [{"name": t.name, "shape": [int(d) for d in t.shape],
                     "type": GGUF_BY_GGML[int(t.tensor_type)].name} for t in reader.tensors]}
    rows, expected, model = _from_table(table)
    assert fields["general.file_type"].contents() == 3  # LLAMA_FTYPE_MOSTLY_Q4_1
    assert model.tied_embeddings and expected["token_embd.weight"] == "q8_0"
    assert recipe_types("Q4_1", rows, model) == expected


@pytest.mark.parametrize("recipe, v_types, down_types, head", [
    ("Q2_K", {"q4_k"}, {"q3_k"}, "q6_k"),  # 12 heads on 2 KV heads: n_gqa 6 >= 4
    ("Q3_K_S", {"q3_k"}, {"q3_k"}, "q6_k"),
    ("Q3_K_M", {"q5_k", "q4_k"}, {"q5_k", "q4_k"}, "q6_k"),
    ("Q3_K_L", {"q5_k"}, {"q5_k"}, "q6_k"),
    ("Q4_K_S", {"q5_k", "q4_k"}, {"q5_k", "q4_k"}, "q6_k"),
    ("Q5_K_S", {"q5_k"}, {"q5_k"}, "q6_k"),
    ("Q5_K_M", {"q6_k", "q5_k"}, {"q6_k", "q5_k"}, "q6_k"),
    ("Q6_K", {"q6_k"}, {"q6_k"}, "q6_k"),
    ("Q8_0", {"q8_0"}, {"q8_0"}, "q8_0"),
    ("IQ4_XS", {"q5_k"}, {"q5_k", "iq4_xs"}, "q6_k"),  # n_gqa >= 4: attn_v q5_k
])
def test_each_recipe_widens_what_llama_cpp_widens(recipe, v_types, down_types, head):
    rows, _, model = _from_table(json.loads(FIXTURE.read_text()))
    types = recipe_types(recipe, rows, model)
    assert {t for n, t in types.items() if "attn_v" in n} == v_types
    assert {t for n, t in types.items() if "ffn_down" in n} == down_types
    assert types["output.weight"] == head
    assert {t for n, t in types.items() if "ffn_up" in n} == {RECIPES[recipe]}


def test_the_importance_matrix_changes_the_rules_where_llama_cpp_says():
    rows, _, model = _from_table(json.loads(FIXTURE.read_text()))
    plain = recipe_types("IQ4_XS", rows, model)
    weighted = recipe_types("IQ4_XS", rows, model, imatrix=True)
    assert plain["blk.0.ffn_down.weight"] == "q5_k" and weighted["blk.0.ffn_down.weight"] == "iq4_xs"
    assert recipe_types("Q4_0", rows, model, imatrix=True)["blk.0.ffn_down.weight"] == "q4_1"
    assert set(recipe_types("Q4_K_M", rows, model, pure=True).values()) == {"q4_k"}


def test_use_more_bits_boosts_half_of_28_blocks_and_unknown_recipes_are_named():
    assert sum(use_more_bits(i, 28) for i in range(28)) == 14
    with pytest.raises(AutocompressError, match="unknown llama.cpp recipe 'Q4_K_X'"):
        recipe_types("Q4_K_X", [], Model(2, 4, 2, True))


def test_a_recipe_becomes_plan_entries_for_every_layer_and_the_embedding(tiny_loaded):
    configs = recipe_configs(tiny_loaded, "Q4_K_M", imatrix=True)
    names = {layer.name for layer in tiny_loaded.layers} | {"model.embed_tokens"}
    assert set(configs) == names
    # hidden 64: no whole q4_k super-block, so llama.cpp's fallback q5_0; the embedding takes
    # the head's rule (tied) and is never imatrix-weighted
    assert configs["model.layers.0.self_attn.q_proj"].short() == "q5_0 imatrix"
    assert configs["model.embed_tokens"].short() == "q8_0"
