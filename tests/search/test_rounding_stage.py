import json

import pytest

from autocompress.accounting import model_footprint
from autocompress.plan import LayerConfig, Plan
from autocompress.search.engine import SearchSettings, run_search
from autocompress.search.rounding_stage import with_learned_rounding
from autocompress.search.space import SearchSpace

SMALL = dict(n_calib=2, n_holdout=2, window_len=64, context=256)


def test_learned_rounding_keeps_every_format_and_byte(tiny_loaded):
    names = [l.name for l in tiny_loaded.layers]
    overrides = {names[0]: {"bits": 16}, names[1]: {"method": "gptq", "clip": True},
                 names[2]: {"sparsity": 0.5}, names[3]: {"gguf": "q4_0"},
                 names[4]: {"bits": 4, "group_size": 128},
                 names[6]: {"method": "gptq", "clip": True, "awq": True},
                 "model.embed_tokens": {"gguf": "q8_0"}}
    plan = Plan(model=tiny_loaded.identity, default=LayerConfig(bits=3), overrides=overrides)
    rounded, changed = with_learned_rounding(plan, tiny_loaded)
    before, after = plan.resolve_model(tiny_loaded), rounded.resolve_model(tiny_loaded)
    untouched = {names[0], names[2], names[3], "model.embed_tokens"}
    assert changed == len(names) - 3
    assert after[names[6]].awq  # an AWQ layer keeps its input scale (format and bytes)
    for name, cfg in before.items():
        if name in untouched:
            assert after[name] == cfg
        else:
            assert after[name].method == "signround"
            assert (after[name].bits, after[name].group_size, after[name].sym) == \
                (cfg.bits, cfg.group_size, cfg.sym)
    assert model_footprint(tiny_loaded, after, context=256).total == \
        model_footprint(tiny_loaded, before, context=256).total
    assert plan.config_for(names[5]).method == "rtn"  # the searched plan is left as it was


def test_a_search_with_learned_rounding_reports_what_eval_of_it_measures(
        tiny_loaded, tiny_model_dir, tmp_path, capsys):
    """search --rounding signround: the chosen plan's RTN layers rounded by learning, kept
    because its held-out KL is lower, and `eval --holdout` reproduces the new figure."""
    from autocompress.cli import main

    budget = model_footprint(tiny_loaded, {l.name: LayerConfig(bits=3)
                                           for l in tiny_loaded.layers}, context=256).total
    settings = SearchSettings(budget=budget, rounding="signround", **SMALL)
    run_search(tiny_loaded, SearchSpace.bits_only([2, 3, 4, 8]), settings, out_dir=tmp_path,
               progress=False, log=lambda m: None)
    plan = Plan.load(tmp_path / "plan.json")
    record = plan.figures["holdout"]
    assert plan.figures["rounding"]["kept"] and plan.figures["rounding"]["layers"] > 0
    assert record["reported"]["kl"] < record["before_rounding"]["kl"]
    assert any(plan.config_for(l.name).method == "signround" for l in tiny_loaded.layers)
    assert "rounding_s" in plan.figures["timings_s"]
    assert main(["eval", str(tmp_path / "plan.json"), "--model", str(tiny_model_dir),
                 "--holdout", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)["kl"]
    assert again == pytest.approx(record["reported"]["kl"], rel=1e-5)


def test_rounding_that_does_not_lower_kl_leaves_the_searched_plan(tiny_loaded, tmp_path,
                                                                  monkeypatch):
    import dataclasses

    import autocompress.search.rounding_stage as stage

    real = stage.evaluate

    def worse(*args, **kwargs):  # the rounded model measured as worse than the searched one
        return dataclasses.replace(real(*args, **kwargs), kl=1e9)

    monkeypatch.setattr(stage, "evaluate", worse)
    budget = model_footprint(tiny_loaded, {l.name: LayerConfig(bits=3)
                                           for l in tiny_loaded.layers}, context=256).total
    result = run_search(tiny_loaded, SearchSpace.bits_only([2, 3, 4, 8]),
                        SearchSettings(budget=budget, rounding="signround", **SMALL),
                        out_dir=tmp_path, progress=False, log=lambda m: None)
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.figures["rounding"]["kept"] is False
    assert plan.figures["rounding"]["measured"]["kl"] == 1e9
    assert plan.figures["holdout"]["reported"]["kl"] == result.chosen.measured["kl"]
    assert all(plan.config_for(l.name).method == "rtn" for l in tiny_loaded.layers)
