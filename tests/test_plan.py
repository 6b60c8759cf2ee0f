import json

import pytest

from autocompress.errors import AutocompressError
from autocompress.plan import LayerConfig, ModelIdentity, Plan, compact_overrides, uniform_plan
from autocompress.provenance import Provenance

LAYERS = {"model.layers.0.self_attn.q_proj": [64, 64], "model.layers.0.mlp.down_proj": [64, 128],
          "model.layers.1.mlp.down_proj": [64, 128]}
IDENTITY = ModelIdentity(name="tiny", content_hash="abc", layers=LAYERS)


def test_overrides_exact_beats_regex_beats_default():
    plan = Plan(model=IDENTITY, default=LayerConfig(bits=4),
                overrides={"re:.*down_proj": {"bits": 8},
                           "model.layers.1.mlp.down_proj": {"bits": 3, "group_size": 32}})
    assert plan.config_for("model.layers.0.self_attn.q_proj") == LayerConfig(bits=4)
    assert plan.config_for("model.layers.0.mlp.down_proj").bits == 8
    last = plan.config_for("model.layers.1.mlp.down_proj")
    assert (last.bits, last.group_size) == (3, 32)


def test_round_trip(tmp_path):
    plan = Plan(model=IDENTITY, default=LayerConfig(bits=3, sym=True),
                overrides={"re:.*q_proj": {"sparsity": 0.5, "prune_method": "magnitude"}},
                figures={"x": 1},
                provenance=Provenance(calib_text="/data/valid.txt", calib_windows=8,
                                      calib_digest="00ff", mode="parallel", gptq_damp=0.05,
                                      gptq_act_order=False, made_by="search"))
    path = tmp_path / "plan.json"
    plan.save(path)
    data = json.loads(path.read_text())
    assert data["schema_version"] == 2
    assert set(data["default"]) >= {"bits", "group_size", "sym", "method", "sparsity", "pattern",
                                    "rank_ratio"}
    assert data["provenance"]["mode"] == "parallel" and data["provenance"]["calib_windows"] == 8
    again = Plan.load(path)
    assert again.resolve(LAYERS) == plan.resolve(LAYERS)
    assert again.figures == {"x": 1}
    assert again.provenance == plan.provenance


def test_v1_plan_loads_without_provenance_and_stays_v1(tmp_path):
    v1 = {"schema_version": 1, "model": {"name": "tiny", "content_hash": "abc", "layers": LAYERS},
          "default": {"bits": 4}, "overrides": {}, "figures": {}}
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(v1))
    plan = Plan.load(path)
    assert plan.provenance is None and plan.default.bits == 4
    plan.save(path)  # written back as what it is: no provenance was invented for it
    assert json.loads(path.read_text())["schema_version"] == 1
    assert Plan.load(path).provenance is None


@pytest.mark.parametrize("change, words", [
    ({"colour": "red"}, "unknown top-level key"),
    ({"provenance": None}, "provenance must be an object"),
    ({"provenance": {"mode": "sideways"}}, "sequential or parallel"),
    ({"provenance": {"calib_windows": 0}}, "calib_windows"),
    ({"provenance": {"temperature": 1}}, "unknown field"),
    ({"schema_version": 2, "provenance": "drop"}, "needs its provenance"),
])
def test_bad_plan_fields_are_named(tmp_path, change, words):
    data = Plan(model=IDENTITY).to_dict()
    for key, value in change.items():
        if value == "drop":
            data.pop(key)
        else:
            data[key] = value
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(AutocompressError, match=words):
        Plan.load(path)


@pytest.mark.parametrize("fields", [
    {"bits": 7}, {"group_size": 100}, {"method": "awq"}, {"sparsity": 0.95},
    {"pattern": "2:4", "sparsity": 0.3}, {"rank_ratio": 0.0}, {"colour": "red"},
])
def test_invalid_config_rejected(fields):
    with pytest.raises(AutocompressError):
        LayerConfig.from_dict(fields)


def test_plan_for_other_model_names_mismatched_layers():
    plan = uniform_plan(IDENTITY, LayerConfig(bits=4))
    other = ModelIdentity(name="other", content_hash="zzz",
                          layers={"model.layers.0.self_attn.q_proj": [64, 32],
                                  "model.layers.0.mlp.down_proj": [64, 128]})
    with pytest.raises(AutocompressError) as err:
        plan.check_model(other)
    message = str(err.value)
    assert "model.layers.1.mlp.down_proj" in message  # missing from the other model
    assert "model.layers.0.self_attn.q_proj" in message  # different shape
    assert "\n" not in message


def test_unknown_override_name_is_an_error():
    plan = Plan(model=IDENTITY, overrides={"model.layers.0.self_attn.qproj": {"bits": 8}})
    with pytest.raises(AutocompressError, match="qproj"):
        plan.check_override_names(LAYERS)


@pytest.mark.parametrize("content", ["{not json", json.dumps({"schema_version": 99}),
                                     json.dumps({"schema_version": 1})])
def test_corrupt_plan_file(tmp_path, content):
    path = tmp_path / "plan.json"
    path.write_text(content)
    with pytest.raises(AutocompressError):
        Plan.load(path)


def test_compact_overrides_only_keeps_differences():
    default = LayerConfig(bits=3)
    configs = {"a": LayerConfig(bits=3), "b": LayerConfig(bits=8, group_size=32)}
    assert compact_overrides(configs, default) == {"b": {"bits": 8, "group_size": 32}}


def test_short_labels():
    assert LayerConfig(bits=4).short() == "4b g64 asym rtn"
    assert LayerConfig(bits=16, pattern="2:4").short() == "fp16 2:4-wanda"
    assert LayerConfig(bits=3, group_size=-1, sym=True, method="gptq", rank_ratio=0.5).short() == \
        "3b gch sym gptq r0.50"


# -- clipped grids ---------------------------------------------------------------------------

def test_clip_is_written_only_when_set_so_older_plans_and_keys_stay_the_same():
    assert "clip" not in LayerConfig(bits=3).to_dict()
    assert LayerConfig(bits=3, clip=True).to_dict()["clip"] is True
    assert LayerConfig(bits=3, clip=True).short() == "3b g64 asym rtn clip"
    assert LayerConfig.from_dict({"bits": 3}) == LayerConfig(bits=3, clip=False)
    assert LayerConfig(bits=16, clip=True) == LayerConfig(bits=16)  # nothing to clip


def test_a_layer_without_clip_under_a_clipped_default_says_so(tmp_path):
    default = LayerConfig(bits=3, clip=True)
    configs = {"model.layers.0.self_attn.q_proj": LayerConfig(bits=3, clip=True),
               "model.layers.0.mlp.down_proj": LayerConfig(bits=3),
               "model.layers.1.mlp.down_proj": LayerConfig(bits=4, clip=True)}
    overrides = compact_overrides(configs, default)
    assert overrides == {"model.layers.0.mlp.down_proj": {"clip": False},
                         "model.layers.1.mlp.down_proj": {"bits": 4}}
    plan = Plan(IDENTITY, default, overrides)
    plan.save(tmp_path / "p.json")
    back = Plan.load(tmp_path / "p.json")
    assert {name: back.config_for(name) for name in LAYERS} == configs


@pytest.mark.parametrize("fields, words", [
    ({"gguf": "q4_k", "clip": True}, "clip and awq apply to the native integer grids"),
    ({"gguf": "q4_k", "awq": True}, "clip and awq apply to the native integer grids"),
    ({"bits": 3, "clip": "yes"}, "clip must be true or false"),
])
def test_bad_clip_settings_are_refused(fields, words):
    with pytest.raises(AutocompressError, match=words):
        LayerConfig(**fields)


# -- GGUF types and the entries outside the blocks -----------------------------------------------

def test_a_gguf_type_is_one_format_however_it_was_written():
    """Merged over a native default, or spelled as llama.cpp prints it, q4_k is one config:
    plans, tables and caches compare configs, so two spellings would be two options."""
    merged = LayerConfig.from_dict({"gguf": "Q4_K"}, LayerConfig(bits=3, group_size=128, sym=True))
    assert merged == LayerConfig(gguf="q4_k") and hash(merged) == hash(LayerConfig(gguf="q4_k"))
    assert merged.short() == "q4_k" and not merged.is_identity
    assert LayerConfig(gguf="iq4_xs", method="imatrix").short() == "iq4_xs imatrix"


@pytest.mark.parametrize("fields, words", [
    ({"gguf": "q7_k"}, "gguf must be one of"),
    ({"gguf": "q4_k", "method": "gptq"}, "method must be 'rtn' or 'imatrix'"),
    ({"gguf": "q4_k", "sparsity": 0.5}, "dense, full-rank"),
    ({"gguf": "q4_k", "pattern": "2:4"}, "dense, full-rank"),
    ({"gguf": "q4_k", "rank_ratio": 0.5}, "dense, full-rank"),
    ({"method": "imatrix", "bits": 4}, "needs a gguf type"),
])
def test_gguf_configs_that_llama_cpp_cannot_store_are_refused(fields, words):
    with pytest.raises(AutocompressError, match=words):
        LayerConfig(**fields)


def test_the_embedding_takes_only_an_exact_override():
    """A regex written for the block linears must not reach the embedding (its 28 M weights
    are a fifth of SmolLM2): it stays float16 unless named."""
    plan = Plan(model=IDENTITY, default=LayerConfig(gguf="q4_k"),
                overrides={"re:.*": {"gguf": "q2_k"}})
    assert plan.config_for("model.embed_tokens").is_identity
    plan = Plan(model=IDENTITY, default=LayerConfig(bits=4),
                overrides={"model.embed_tokens": {"gguf": "q6_k"}})
    assert plan.config_for("model.embed_tokens") == LayerConfig(gguf="q6_k")
    plan.check_override_names(LAYERS, tables=["model.embed_tokens"])


@pytest.mark.parametrize("override, words", [
    ({"bits": 4}, "take a gguf type"),
    ({"gguf": "q4_k", "method": "imatrix"}, "without an importance matrix"),
])
def test_the_embedding_is_float16_or_a_gguf_type_without_imatrix(override, words):
    with pytest.raises(AutocompressError, match=f"model.embed_tokens.*{words}"):
        Plan(model=IDENTITY, overrides={"model.embed_tokens": override})


def test_a_tied_head_is_named_by_its_embedding():
    plan = Plan(model=IDENTITY, overrides={"lm_head": {"gguf": "q6_k"}})
    with pytest.raises(AutocompressError, match="tied.*model.embed_tokens"):
        plan.check_override_names(LAYERS, tables=["model.embed_tokens"])
    plan.check_override_names(LAYERS, tables=["model.embed_tokens", "lm_head"])


def test_a_gguf_plan_round_trips(tmp_path):
    plan = Plan(model=IDENTITY, default=LayerConfig(gguf="q4_k", method="imatrix"),
                overrides={"re:.*down_proj": {"gguf": "q6_k", "method": "rtn"},
                           "model.embed_tokens": {"gguf": "q8_0"}})
    plan.save(tmp_path / "p.json")
    back = Plan.load(tmp_path / "p.json")
    assert back.config_for("model.layers.0.mlp.down_proj") == LayerConfig(gguf="q6_k")
    assert back.config_for("model.layers.0.self_attn.q_proj") == \
        LayerConfig(gguf="q4_k", method="imatrix")
    assert back.config_for("model.embed_tokens") == LayerConfig(gguf="q8_0")
