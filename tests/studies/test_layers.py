"""`study layers` on two tiny models: per-layer costs by proxy and measurement, profiles that
are shares of each model's total, correlations between models, resume after a kill."""

import csv
import json

import pytest

from autocompress.errors import AutocompressError
from autocompress.plan import LayerConfig
from autocompress.studies.layers import (
    LayersSettings,
    ModelInput,
    depth_profile,
    kind_profile,
    run_layers,
    spearman,
)

from ..conftest import make_tiny_model_dir

SETTINGS = LayersSettings(option=LayerConfig(bits=2, group_size=32), measure_windows=1,
                          calib_windows=2, window_len=32, depth_bins=2)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("layers-models")
    return [str(make_tiny_model_dir(root / "a", seed=0)),
            str(make_tiny_model_dir(root / "b", seed=1, n_layers=4))]


class _Stopped(Exception):
    pass


def test_profiles_are_shares_and_costs_come_from_both_sides(two_models, tmp_path):
    data = run_layers([ModelInput(m) for m in two_models], SETTINGS, tmp_path, progress=False,
                      log=lambda m: None)
    assert list(data["models"]) == two_models
    for entry in data["models"].values():
        n_layers = 7 * entry["n_blocks"]
        assert len(entry["proxy"]) == len(entry["measured"]) == n_layers
        assert all(v >= 0 for v in entry["proxy"].values())
        assert all(v > 0 for v in entry["measured"].values())  # 2-bit: every layer costs
        for source in ("proxy", "measured"):
            profile = entry["profiles"][source]
            assert sum(profile["kind"].values()) == pytest.approx(1.0)
            assert sum(profile["depth"]) == pytest.approx(1.0) and len(profile["depth"]) == 2
        assert -1 <= entry["proxy_vs_measured"] <= 1
    pair = data["correlations"][f"{two_models[0]} vs {two_models[1]}"]
    assert set(pair) == {"proxy", "measured"} and -1 <= pair["proxy"]["kind"] <= 1
    rows = list(csv.DictReader((tmp_path / "layers.csv").open()))
    assert len(rows) == 7 * (2 + 4)
    for name in ("layers.png", "profiles.png"):
        assert (tmp_path / "figures" / name).read_bytes()[:4] == b"\x89PNG"


def test_a_measured_layer_is_the_kl_of_that_layer_alone(two_models, tmp_path):
    from autocompress.compress.apply import compress_model
    from autocompress.data import load_stream
    from autocompress.evaluate import evaluate
    from autocompress.model import load_model

    data = run_layers([ModelInput(two_models[0])], SETTINGS, tmp_path, progress=False,
                      log=lambda m: None)
    loaded = load_model(two_models[0])
    name = loaded.layers[3].name
    windows = load_stream(loaded.tokenizer, None, "calib").windows(1, 32, from_end=True)
    configs = {layer.name: LayerConfig() for layer in loaded.layers}  # float16
    alone = compress_model(loaded, {**configs, name: SETTINGS.option}, progress=False)
    expected = evaluate(alone, windows, loaded.model, progress=False).kl
    assert data["models"][two_models[0]]["measured"][name] == pytest.approx(expected, rel=1e-4)


def test_an_interrupted_study_resumes_without_measuring_a_layer_twice(two_models, tmp_path,
                                                                       monkeypatch):
    from autocompress import evaluate as evaluate_module

    measured = []

    original = evaluate_module.evaluate

    def counting(*args, **kwargs):
        if counting.fail_after is not None and len(measured) == counting.fail_after:
            raise _Stopped
        measured.append(1)
        return original(*args, **kwargs)

    counting.fail_after = 5
    monkeypatch.setattr(evaluate_module, "evaluate", counting)
    with pytest.raises(_Stopped):
        run_layers([ModelInput(m) for m in two_models], SETTINGS, tmp_path, progress=False,
                   log=lambda m: None)
    kept = json.loads((tmp_path / "layers.json").read_text())["models"][two_models[0]]
    assert len(kept["measured"]) == 5
    measured.clear()
    counting.fail_after = None
    data = run_layers([ModelInput(m) for m in two_models], SETTINGS, tmp_path, resume=True,
                      progress=False, log=lambda m: None)
    assert len(measured) == 7 * (2 + 4) - 5
    assert all(data["models"][two_models[0]]["measured"][k] == v
               for k, v in kept["measured"].items())


def test_a_given_table_is_read_and_checked(two_models, tmp_path, tiny_loaded):
    from autocompress.sensitivity.table import SensitivityTable

    first = run_layers([ModelInput(two_models[0])], SETTINGS, tmp_path / "one",
                       progress=False, log=lambda m: None)
    costs = first["models"][two_models[0]]["proxy"]
    names = list(costs)
    table = SensitivityTable(layers=names, options=[[LayerConfig(), SETTINGS.option]] * len(names),
                             cost=[[0.0, 2.0 * costs[n]] for n in names],
                             bytes=[[1, 1]] * len(names))
    table.save(tmp_path / "t.json")
    settings = LayersSettings(option=SETTINGS.option, measure_windows=0, window_len=32)
    data = run_layers([ModelInput(two_models[0], str(tmp_path / "t.json"))], settings,
                      tmp_path / "two", progress=False, log=lambda m: None)
    entry = data["models"][two_models[0]]
    assert entry["proxy"] == pytest.approx({n: 2.0 * c for n, c in costs.items()})
    assert entry["measured"] == {} and "measured" not in entry["profiles"]
    with pytest.raises(AutocompressError, match="is not"):
        run_layers([ModelInput(two_models[1], str(tmp_path / "t.json"))], settings,
                   tmp_path / "three", progress=False, log=lambda m: None)
    with pytest.raises(AutocompressError, match="has no option"):
        run_layers([ModelInput(two_models[0], str(tmp_path / "t.json"))],
                   LayersSettings(option=LayerConfig(bits=4), measure_windows=0),
                   tmp_path / "four", progress=False, log=lambda m: None)
    del tiny_loaded


def test_profile_arithmetic():
    costs = {"a": 1.0, "b": 3.0, "c": 4.0}
    assert kind_profile(costs, {"a": "q", "b": "down", "c": "q"}) == {"q": 0.625, "down": 0.375}
    assert depth_profile(costs, {"a": 0, "b": 1, "c": 3}, 4, 2) == [0.5, 0.5]
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_the_command_runs_and_refuses_bad_input_in_one_line(two_models, tmp_path, capsys):
    from autocompress.cli import main

    base = ["study", "layers", "--models", ",".join(two_models), "--calib-windows", "2",
            "--window-len", "32", "--measure-windows", "0"]
    assert main(base + ["--tables", "-", "--out", str(tmp_path / "bad")]) == 2
    assert "one per model" in capsys.readouterr().err
    # 'build' for one model, a path for the other (a leading '-' would read as an option)
    assert main(base + ["--tables", "build,missing.json", "--out", str(tmp_path / "bad")]) == 2
    assert "'missing.json' not found" in capsys.readouterr().err
    assert main(base + ["--layer-bits", "1", "--out", str(tmp_path / "bad")]) == 2
    assert "bits must be one of" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "ok")]) == 0
    said = capsys.readouterr()
    out = said.out + said.err
    assert "share of the model's cost by kind" in out and "by kind ρ" in out
    assert (tmp_path / "ok" / "layers.csv").is_file()
