"""`study proxies` on the tiny model: plans per family that really are of that family, their KL
measured once for all proxies, correlations per family, resume without measuring twice."""

import csv
import json

import numpy as np
import pytest

from autocompress.errors import AutocompressError
from autocompress.plan import LayerConfig
from autocompress.search.space import SearchSpace
from autocompress.studies.proxies import (
    ProxiesSettings,
    family_of,
    family_plans,
    run_proxies,
)

SETTINGS = ProxiesSettings(proxies=("fisher", "hessian"), plans_per_family=4, calib_windows=2,
                           holdout_windows=1, window_len=32,
                           families=("quantization", "sparse", "low rank"))


class _Stopped(Exception):
    pass


def test_family_plans_hold_their_family_and_the_precise_option_only(tiny_loaded):
    space = SearchSpace.load("joint")
    options = [space.for_layer(layer) for layer in tiny_loaded.layers]
    groups = space.decision_groups(tiny_loaded.layers)
    for family in ("quantization", "sparse", "2:4", "low rank"):
        plans = family_plans(options, groups, family, 6, np.random.default_rng(0))
        assert len(plans) == 6
        for choice in plans:
            fams = {family_of(options[l][o]) for l, o in enumerate(choice)}
            chosen = [options[l][o] for l, o in enumerate(choice)]
            assert family in fams  # at least one group of the family
            others = [c for c in chosen if family_of(c) != family]
            assert all(c == LayerConfig(bits=8) for c in others)  # the precise option
            for group in groups:  # tied layers share one decision
                assert len({choice[i] for i in group}) == 1


def test_every_proxy_is_scored_on_the_same_measured_plans(tiny_model_dir, tmp_path):
    data = run_proxies([str(tiny_model_dir)], SETTINGS, tmp_path, progress=False,
                       log=lambda m: None)
    entry = data["models"][str(tiny_model_dir)]
    assert len(entry["plans"]) == 3 * 4
    assert all(p["kl"] > 0 for p in entry["plans"].values())
    assert set(entry["proxies"]) == {"fisher", "hessian"}
    for record in entry["proxies"].values():
        assert record["table_s"] > 0
        assert set(record["families"]) == {"quantization", "sparse", "low rank", "all"}
        assert record["families"]["all"]["plans"] == 12
        rho = record["families"]["all"]["spearman"]
        assert rho is None or -1 <= rho <= 1
    rows = list(csv.DictReader((tmp_path / "proxies.csv").open()))
    assert len(rows) == 2 * 4
    assert (tmp_path / "figures" / "proxies.png").read_bytes()[:4] == b"\x89PNG"


def test_an_interrupted_study_resumes_without_measuring_a_plan_twice(tiny_model_dir, tmp_path,
                                                                     monkeypatch):
    from autocompress.search import measure

    real, calls = measure.PlanMeter.measure, []

    def counting(self, configs, *args, **kwargs):
        if counting.fail_after is not None and len(calls) == counting.fail_after:
            raise _Stopped
        calls.append(1)
        return real(self, configs, *args, **kwargs)

    counting.fail_after = 5
    monkeypatch.setattr(measure.PlanMeter, "measure", counting)
    with pytest.raises(_Stopped):
        run_proxies([str(tiny_model_dir)], SETTINGS, tmp_path, progress=False,
                    log=lambda m: None)
    kept = json.loads((tmp_path / "proxies.json").read_text())["models"][str(tiny_model_dir)]
    assert len(kept["plans"]) == 5
    calls.clear()
    counting.fail_after = None
    # the calibration statistics the first run took are on disk, and read back, not taken again
    from autocompress.compress.stats_store import StatsStore

    from autocompress.compress.stats_store import KEY_FILE

    assert len(list((tmp_path / "stats").glob(f"*/{KEY_FILE}"))) == 1
    fills = []
    real_fill = StatsStore.fill
    monkeypatch.setattr(StatsStore, "fill", lambda self, *a, **k: (fills.append(1),
                                                                    real_fill(self, *a, **k))[1])
    data = run_proxies([str(tiny_model_dir)], SETTINGS, tmp_path, resume=True, progress=False,
                       log=lambda m: None)
    assert fills == []
    assert len(calls) == 12 - 5
    assert all(data["models"][str(tiny_model_dir)]["plans"][k] == v
               for k, v in kept["plans"].items())


def test_a_table_interrupted_and_resumed_costs_the_time_of_both_attempts(
        tiny_model_dir, tmp_path, monkeypatch):
    """The cost is what the table took in all: the seconds before the interrupt are saved
    while it builds (heartbeat) and credited when it resumes from its cache."""
    import time

    from autocompress.sensitivity import build
    from autocompress.studies import proxies

    monkeypatch.setattr(proxies, "HEARTBEAT_S", 0.05)
    real = build.build_table

    def slow_then_stopped(loaded, space, proxy, *args, **kwargs):
        if proxy.name == "hessian":
            time.sleep(1.5)
            # while it builds, the time so far is on disk (what a SIGKILL would leave)
            on_disk = json.loads((tmp_path / "proxies.json").read_text())
            assert on_disk["models"][str(tiny_model_dir)]["building"]["hessian"][0] >= 1.0
            raise _Stopped
        return real(loaded, space, proxy, *args, **kwargs)

    monkeypatch.setattr(build, "build_table", slow_then_stopped)
    with pytest.raises(_Stopped):
        run_proxies([str(tiny_model_dir)], SETTINGS, tmp_path, progress=False,
                    log=lambda m: None)
    monkeypatch.setattr(build, "build_table", real)
    said = []
    data = run_proxies([str(tiny_model_dir)], SETTINGS, tmp_path, resume=True, progress=False,
                       log=said.append)
    entry = data["models"][str(tiny_model_dir)]
    first, second = entry["proxies"]["hessian"]["attempts_s"]
    assert first >= 1.5 and second > 0
    assert entry["proxies"]["hessian"]["table_s"] == pytest.approx(first + second, abs=0.01)
    assert len(entry["proxies"]["fisher"]["attempts_s"]) == 1  # finished the first time
    assert entry["building"] == {}
    assert any("earlier attempt(s) credited" in line for line in said)


def test_unknown_proxy_or_family_is_said_before_any_work(tiny_model_dir, tmp_path):
    with pytest.raises(AutocompressError, match="unknown proxy"):
        run_proxies([str(tiny_model_dir)], ProxiesSettings(proxies=("fishr",)), tmp_path)
    with pytest.raises(AutocompressError, match="unknown option family"):
        run_proxies([str(tiny_model_dir)], ProxiesSettings(families=("pruning",)), tmp_path)
    assert not (tmp_path / "proxies.json").exists()


def test_the_command_runs_and_refuses_a_bad_proxy_in_one_line(tiny_model_dir, tmp_path, capsys):
    from autocompress.cli import main

    base = ["study", "proxies", "--model", str(tiny_model_dir), "--calib-windows", "2",
            "--eval-windows", "1", "--window-len", "32", "--plans-per-family", "3"]
    assert main(base + ["--proxies", "fisher,fishr", "--out", str(tmp_path / "bad")]) == 2
    assert "unknown proxy 'fishr'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(base + ["--proxies", "fisher", "--out", str(tmp_path / "ok")]) == 0
    said = capsys.readouterr()
    assert "Spearman of the predicted cost" in said.out + said.err
    assert (tmp_path / "ok" / "proxies.csv").is_file()
