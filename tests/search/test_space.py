from pathlib import Path

import pytest

from autocompress.errors import AutocompressError
from autocompress.plan import LayerConfig
from autocompress.search.space import SearchSpace, spaces_dir

REPO = Path(__file__).resolve().parents[2]
SPACES = REPO / "autocompress" / "search_spaces"


def test_bundled_bits_space_equals_bits_flag():
    space = SearchSpace.from_yaml(SPACES / "bits.yaml")
    assert space.options == SearchSpace.bits_only([2, 3, 4, 8]).options
    assert space.options[0] == LayerConfig(bits=2, group_size=64, sym=False, method="rtn")


@pytest.mark.parametrize("text, match", [
    ("options: [{bits: 7}]", "bits"),
    ("colours: []\noptions: []", "unknown keys"),
    ("options: 3", "options"),
    ("options: [{bits: 4", "YAML"),
    ("defaults: {method: imatrix}\noptions: [{bits: 4}]", "needs a gguf type"),
    ("defaults: {method: gptq}\noptions: [{gguf: q4_k}]", "method must be 'rtn' or 'imatrix'"),
    ("options: [4]", "options are maps"),
    ("defaults: 3\noptions: [{bits: 4}]", "'defaults' is a map"),
    ("options: [{gguf: q4_k}]\ntables: {model.embed_tokens: {gguf: q4_k, method: imatrix}}",
     "without an importance matrix"),
])
def test_bad_space_files(tmp_path, text, match):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(AutocompressError, match=match):
        SearchSpace.from_yaml(path)


def test_bad_bits_flag():
    with pytest.raises(AutocompressError, match="not supported"):
        SearchSpace.bits_only([1, 4])


def test_kinds_tied_and_pinned(tiny_loaded, tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("""
defaults: {group_size: 32}
options: [{bits: 3}, {bits: 4}]
kinds:
  down: [{bits: 4}, {bits: 8}]
tied: [[q, k, v], [gate, up]]
pinned:
  "re:model\\\\.layers\\\\.0\\\\.self_attn\\\\.q_proj": {bits: 8}
""")
    space = SearchSpace.from_yaml(path)
    layers = tiny_loaded.layers
    by_name = {l.name: l for l in layers}
    assert space.for_layer(by_name["model.layers.0.self_attn.q_proj"]) == [LayerConfig(bits=8, group_size=32)]
    assert [c.bits for c in space.for_layer(by_name["model.layers.1.mlp.down_proj"])] == [4, 8]
    groups = [[layers[i].name for i in g] for g in space.decision_groups(layers)]
    assert ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
            "model.layers.1.self_attn.v_proj"] in groups
    assert ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"] in groups  # q pinned
    assert ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"] in groups
    assert sum(len(g) for g in groups) == len(layers)
    assert [c.bits for c in space.uniform_configs()] == [4]


def test_tied_kinds_need_equal_options(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("options: [{bits: 3}]\nkinds: {q: [{bits: 4}]}\ntied: [[q, k]]\n")
    with pytest.raises(AutocompressError, match="same options"):
        SearchSpace.from_yaml(path)


def test_spaces_load_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # names do not depend on the working directory
    assert spaces_dir().resolve() == SPACES  # package data, beside the code
    assert SearchSpace.load("joint") == SearchSpace.from_yaml(SPACES / "joint.yaml")
    assert SearchSpace.load("joint").name == "joint"
    assert SearchSpace.load("bits").name == "bits"
    with pytest.raises(AutocompressError, match="unknown search space 'nope'.*bits, gguf, joint"):
        SearchSpace.load("nope")
    with pytest.raises(AutocompressError, match="not found"):
        SearchSpace.load("mine.yaml")


def test_old_name_default_is_a_deprecated_alias_of_joint():
    with pytest.warns(FutureWarning, match="'default' is now called 'joint'"):
        old = SearchSpace.load("default")
    joint = SearchSpace.load("joint")
    assert (old.options, old.kinds, old.tied, old.pinned) == \
        (joint.options, joint.kinds, joint.tied, joint.pinned)
    assert old.name == "default"  # a study begun with --space default resumes with it


def test_the_gguf_space_is_llama_cpps_types_with_imatrix_and_a_fixed_embedding():
    space = SearchSpace.load("gguf")
    assert space.all_gguf
    assert {cfg.gguf for cfg in space.options} >= {"q2_k", "q3_k", "q4_k", "q6_k", "q8_0"}
    assert all(cfg.method == "imatrix" for cfg in space.options)
    assert space.tables == {"model.embed_tokens": LayerConfig(gguf="q8_0")}
