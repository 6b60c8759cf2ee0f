"""Decode-speed predictors of the search: a llama.cpp speed profile predicts GGUF plans (per
weight and stored type, fallbacks applied) and, with --min-tps, holds the search to plans it
predicts fast enough; profiles of another model, native formats and unprofiled types are named."""

from __future__ import annotations

import pytest

from autocompress.errors import AutocompressError
from autocompress.hardware.llamacpp_speed import LlamaCppSpeed
from autocompress.plan import LayerConfig
from autocompress.search.engine import SearchSettings, run_search
from autocompress.search.space import SearchSpace
from autocompress.search.speed import LlamaCppDecode

T0 = 0.010  # seconds per token of the q8_0 reference file
COST = {"q4_0": -2e-9, "q5_0": -1e-9, "f16": 4e-9}  # seconds per weight, relative to q8_0
EMBEDDING = {"model.embed_tokens": LayerConfig(gguf="q8_0")}


def _speed(loaded, **changes) -> LlamaCppSpeed:
    fields = dict(model=loaded.name, content_hash=loaded.identity.content_hash,
                  engine="llama.cpp", machine="test", threads=2, reference="q8_0", t0_s=T0,
                  per_weight_s=dict(COST))
    return LlamaCppSpeed(**{**fields, **changes})


def _weights(loaded) -> int:
    return sum(l.n_params for l in loaded.layers)


def test_a_plan_is_predicted_per_weight_and_stored_type(tiny_loaded):
    decode = LlamaCppDecode(tiny_loaded, _speed(tiny_loaded), EMBEDDING, context=256)
    q8 = {l.name: LayerConfig(gguf="q8_0") for l in tiny_loaded.layers}
    assert decode.estimate(q8).seconds_per_token == pytest.approx(T0)
    q4 = {l.name: LayerConfig(gguf="q4_0") for l in tiny_loaded.layers}
    assert decode.estimate(q4).seconds_per_token == pytest.approx(
        T0 + COST["q4_0"] * _weights(tiny_loaded))
    # q4_k on the tiny model's 64- and 128-wide rows is stored as q5_0 (llama.cpp's fallback)
    q4k = {l.name: LayerConfig(gguf="q4_k") for l in tiny_loaded.layers}
    assert decode.estimate(q4k).seconds_per_token == pytest.approx(
        T0 + COST["q5_0"] * _weights(tiny_loaded))
    # a float16 embedding costs what f16 costs against the reference type
    plain = LlamaCppDecode(tiny_loaded, _speed(tiny_loaded), {}, context=256)
    embed = tiny_loaded.tables[0]
    assert plain.estimate(q8).seconds_per_token == pytest.approx(
        T0 + COST["f16"] * embed.out_features * embed.in_features)


def test_another_models_profile_a_native_format_and_an_unprofiled_type_are_named(tiny_loaded):
    with pytest.raises(AutocompressError, match="measured on 'other'.*profile --engine llamacpp"):
        LlamaCppDecode(tiny_loaded, _speed(tiny_loaded, model="other", content_hash="x"),
                       EMBEDDING, context=256)
    decode = LlamaCppDecode(tiny_loaded, _speed(tiny_loaded), EMBEDDING, context=256)
    name = tiny_loaded.layers[0].name
    configs = {l.name: LayerConfig(gguf="q8_0") for l in tiny_loaded.layers}
    with pytest.raises(AutocompressError, match="predicts GGUF types.*--space gguf"):
        decode.estimate({**configs, name: LayerConfig(bits=4)})
    with pytest.raises(AutocompressError, match="no figure for q5_1"):
        decode.estimate({**configs, name: LayerConfig(gguf="q5_1")})


def test_min_tps_holds_a_gguf_search_to_plans_llamacpp_decodes_fast_enough(tiny_loaded,
                                                                           tmp_path):
    pytest.importorskip("xllamacpp", reason="llama.cpp (pip install 'autocompress[llamacpp]')")
    path = tmp_path / "space.yaml"
    path.write_text("options: [{gguf: q4_0}, {gguf: q8_0}]\n"
                    "tables: {model.embed_tokens: {gguf: q8_0}}\n")
    space = SearchSpace.load(path)
    speed = _speed(tiny_loaded)
    fast = T0 + COST["q4_0"] * _weights(tiny_loaded)
    limit = (T0 + fast) / 2  # half-way between all-q8_0 and all-q4_0
    common = dict(budget=10**9, n_calib=2, n_holdout=2, window_len=64, context=256,
                  speed_profile=speed)
    free = run_search(tiny_loaded, space, SearchSettings(**common), out_dir=tmp_path / "free",
                      progress=False, log=lambda m: None)
    held = run_search(tiny_loaded, space, SearchSettings(**common, max_latency_s=limit),
                      out_dir=tmp_path / "held", progress=False, log=lambda m: None)
    assert free.chosen.decode.seconds_per_token > limit  # unlimited: q8_0, slower than asked
    assert held.chosen.decode.seconds_per_token <= limit * (1 + 1e-9)
    q4 = sum(l.n_params for l in tiny_loaded.layers
             if held.chosen.configs[l.name].gguf == "q4_0")
    assert q4 >= _weights(tiny_loaded) / 2 * (1 - 1e-9)
    with pytest.raises(AutocompressError, match="no plan in the search space reaches"):
        run_search(tiny_loaded, space, SearchSettings(**common, max_latency_s=fast * 0.9),
                   out_dir=tmp_path / "none", progress=False, log=lambda m: None)


def test_the_cli_profiles_the_tiny_model_in_llamacpp_and_searches_with_that_profile(
        tiny_model_dir, tmp_path, capsys):
    """`profile --engine llamacpp` on a Hugging Face directory (exported through hf_source),
    then `search --speed-profile` with it: the chosen plan carries llama.cpp's predicted
    speed, and the terminal shows where the prediction came from."""
    pytest.importorskip("xllamacpp", reason="llama.cpp (pip install 'autocompress[llamacpp]')")
    import json

    from autocompress.cli import main

    speed = tmp_path / "speed.yaml"
    assert main(["profile", "--engine", "llamacpp", "--model", str(tiny_model_dir),
                 "--formats", "q4_0", "--out", str(speed)]) == 0
    space = tmp_path / "space.yaml"
    space.write_text("options: [{gguf: q4_0}, {gguf: q8_0}]\n"
                     "tables: {model.embed_tokens: {gguf: q8_0}}\n")
    out = tmp_path / "run"
    assert main(["search", "--model", str(tiny_model_dir), "--space", str(space),
                 "--budget", "10MB", "--context", "64", "--calib-windows", "2",
                 "--holdout-windows", "1", "--window-len", "64", "--speed-profile", str(speed),
                 "--min-tps", "1", "--trials", "0", "--eval-top", "0", "--export", "none",
                 "--out", str(out)]) == 0
    assert "Predicted decode on llama.cpp" in capsys.readouterr().err
    decode = json.loads((out / "plan.json").read_text())["figures"]["decode"]
    profile = LlamaCppSpeed.load(speed)
    assert decode["tokens_per_s"] >= 1
    assert decode["seconds_per_token"] <= profile.t0_s * 1.5  # q4_0/q8_0 only: near the q8_0 file

    # `estimate` predicts the same from the plan and the model's config alone (no weights)
    capsys.readouterr()
    assert main(["estimate", str(out / "plan.json"), "--speed-profile", str(speed),
                 "--context", "64", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    estimated = printed["llamacpp_decode"]
    assert estimated["seconds_per_token"] == pytest.approx(decode["seconds_per_token"], rel=1e-9)
    assert "memory" not in printed  # no --device: no device figures
