import json

import pytest

from autocompress.accounting import model_footprint
from autocompress.plan import LayerConfig, Plan
from autocompress.search.engine import SearchSettings, run_search
from autocompress.search.exact import InfeasibleBudget
from autocompress.search.space import SearchSpace

SMALL = dict(n_calib=2, n_holdout=2, window_len=64, context=256)


def _uniform_total(tiny_loaded, bits):
    configs = {l.name: LayerConfig(bits=bits) for l in tiny_loaded.layers}
    return model_footprint(tiny_loaded, configs, context=256).total


def test_search_fits_budget_and_beats_or_matches_uniform(tiny_loaded, tmp_path):
    budget = _uniform_total(tiny_loaded, 3) + 2000
    space = SearchSpace.bits_only([2, 3, 4, 8])
    result = run_search(tiny_loaded, space, SearchSettings(budget=budget, **SMALL),
                        out_dir=tmp_path, progress=False, log=lambda m: None)
    assert result.chosen.footprint.total <= budget
    uniform = [c for c in result.candidates if "uniform" in c.label]
    assert uniform and uniform[0].configs[tiny_loaded.layers[0].name].bits == 3
    assert result.chosen.measured["kl"] <= uniform[0].measured["kl"]
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.resolve(l.name for l in tiny_loaded.layers) == result.chosen.configs
    assert plan.figures["chosen"] == result.chosen.label
    assert (tmp_path / "sensitivity.json").is_file()


def test_sensitivity_table_is_reused_and_rebuilt_when_corrupt(tiny_loaded, tmp_path):
    budget = _uniform_total(tiny_loaded, 4)
    space = SearchSpace.bits_only([2, 4, 8])
    settings = SearchSettings(budget=budget, **SMALL)
    run_search(tiny_loaded, space, settings, out_dir=tmp_path, progress=False, log=lambda m: None)
    messages = []
    run_search(tiny_loaded, space, settings, out_dir=tmp_path, progress=False, log=messages.append)
    assert any("reusing" in m for m in messages)
    (tmp_path / "sensitivity.cache.json").write_text("{broken")
    messages.clear()
    run_search(tiny_loaded, space, settings, out_dir=tmp_path, progress=False, log=messages.append)
    assert any("corrupt" in m for m in messages)
    json.loads((tmp_path / "sensitivity.cache.json").read_text())  # rewritten whole


def test_infeasible_budget_states_the_smallest_size(tiny_loaded):
    smallest = _uniform_total(tiny_loaded, 2)
    with pytest.raises(InfeasibleBudget) as err:
        run_search(tiny_loaded, SearchSpace.bits_only([2, 4]),
                   SearchSettings(budget=smallest - 1, **SMALL), progress=False, log=lambda m: None)
    assert err.value.minimum == smallest
    assert f"{smallest} bytes" in str(err.value)


def test_larger_budget_gets_more_bits(tiny_loaded):
    space = SearchSpace.bits_only([2, 3, 4, 8])
    small = run_search(tiny_loaded, space, SearchSettings(budget=_uniform_total(tiny_loaded, 3), **SMALL),
                       progress=False, log=lambda m: None)
    large = run_search(tiny_loaded, space, SearchSettings(budget=_uniform_total(tiny_loaded, 8), **SMALL),
                       progress=False, log=lambda m: None)
    assert large.chosen.footprint.layer_weights > small.chosen.footprint.layer_weights
    assert large.chosen.measured["kl"] < small.chosen.measured["kl"]


def test_tied_layers_share_one_choice_and_pins_hold(tiny_loaded, tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("options: [{bits: 2}, {bits: 3}, {bits: 4}, {bits: 8}]\n"
                    "tied: [[q, k, v], [gate, up]]\n"
                    "pinned: {'re:.*[.]1[.]mlp[.]down_proj': {bits: 8}}\n")
    space = SearchSpace.from_yaml(path)
    result = run_search(tiny_loaded, space, SearchSettings(budget=_uniform_total(tiny_loaded, 4), **SMALL),
                        progress=False, log=lambda m: None)
    for cand in result.candidates:
        cfg = cand.configs
        for block in (0, 1):
            attn = {cfg[f"model.layers.{block}.self_attn.{k}_proj"] for k in "qkv"}
            mlp = {cfg[f"model.layers.{block}.mlp.{k}_proj"] for k in ("gate", "up")}
            assert len(attn) == 1 and len(mlp) == 1
        assert cfg["model.layers.1.mlp.down_proj"].bits == 8
