from types import SimpleNamespace

from autocompress.accounting import layer_bytes
from autocompress.plan import LayerConfig
from autocompress.search.recipes import (
    DEFAULT_PAIRS,
    best_llama_cpp_recipe,
    boosted_blocks,
    llama_cpp_configs,
)

N_BLOCKS = 30
# SmolLM2-135M block linears: kind -> (out, in)
SHAPES = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),
          "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}
SUFFIX = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
          "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
          "down": "mlp.down_proj"}


def fake_layers(n_blocks=N_BLOCKS):
    return [SimpleNamespace(name=f"model.layers.{b}.{SUFFIX[k]}", kind=k, block=b,
                            out_features=SHAPES[k][0], in_features=SHAPES[k][1])
            for b in range(n_blocks) for k in SHAPES]


def total_bytes(layers, configs):
    return sum(layer_bytes(l.out_features, l.in_features, configs[l.name]) for l in layers)


def test_boosted_blocks_for_30():
    # 30 // 8 = 3: blocks 0-2 and 27-29, plus multiples of 3
    expected = set(range(3)) | set(range(27, 30)) | set(range(0, 30, 3))
    assert set(boosted_blocks(N_BLOCKS)) == expected
    assert boosted_blocks(N_BLOCKS) == sorted(expected)


def test_boosted_blocks_small_model_keeps_first_and_last():
    assert boosted_blocks(4) == [0, 3]  # eighth is at least one block
    assert boosted_blocks(1) == [0]


def test_configs_boost_only_v_and_down_in_boosted_blocks():
    layers = fake_layers()
    configs = llama_cpp_configs(layers, N_BLOCKS, base=3, boost=4)
    boosted = set(boosted_blocks(N_BLOCKS))
    assert set(configs) == {l.name for l in layers}
    for l in layers:
        want = 4 if l.kind in ("v", "down") and l.block in boosted else 3
        assert configs[l.name] == LayerConfig(bits=want, group_size=64)


def test_configs_skip_layers_without_block():
    head = SimpleNamespace(name="lm_head", kind="lm_head", block=None, out_features=10,
                           in_features=576)
    assert "lm_head" not in llama_cpp_configs([head, *fake_layers(2)], 2, 4, 8)


def test_best_recipe_fits_and_next_larger_does_not():
    layers = fake_layers()
    sizes = sorted(total_bytes(layers, llama_cpp_configs(layers, N_BLOCKS, b, h))
                   for b, h in DEFAULT_PAIRS)
    capacity = (sizes[5] + sizes[6]) // 2  # between the 6th and 7th smallest recipes
    label, configs = best_llama_cpp_recipe(layers, N_BLOCKS, capacity)
    chosen = total_bytes(layers, configs)
    assert chosen == sizes[5] <= capacity
    assert min(s for s in sizes if s > chosen) > capacity
    base = min(c.bits for c in configs.values())
    boost = max(c.bits for c in configs.values())
    assert label.startswith(f"llama.cpp-style {base}/{boost} ")
    assert f"at {boost} bits" in label


def test_best_recipe_exact_capacity_is_allowed():
    layers = fake_layers()
    size = total_bytes(layers, llama_cpp_configs(layers, N_BLOCKS, 4, 6))
    label, _ = best_llama_cpp_recipe(layers, N_BLOCKS, size, pairs=((4, 6), (4, 8)))
    assert label.startswith("llama.cpp-style 4/6")


def test_best_recipe_none_when_nothing_fits():
    layers = fake_layers()
    smallest = min(total_bytes(layers, llama_cpp_configs(layers, N_BLOCKS, b, h, g))
                   for b, h in DEFAULT_PAIRS for g in (64, 128))
    assert best_llama_cpp_recipe(layers, N_BLOCKS, smallest - 1) is None
    assert best_llama_cpp_recipe(layers, N_BLOCKS, smallest) is not None


def test_group_128_recipes_fill_the_gaps_between_group_64_widths():
    layers = fake_layers()
    uniform3 = total_bytes(layers, {l.name: LayerConfig(bits=3, group_size=64) for l in layers})
    label, configs = best_llama_cpp_recipe(layers, N_BLOCKS, uniform3)
    assert "3/4 g128" in label or "3/5 g128" in label
    assert total_bytes(layers, configs) <= uniform3
