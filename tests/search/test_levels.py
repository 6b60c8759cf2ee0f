"""Levels 1-3 of the search on the tiny model: the proxy front, the Optuna study (seeded,
constrained, resumable) and the Ray Tune level (ASHA, restorable after SIGKILL)."""

import contextlib
import json
import os
import signal
import subprocess
import sys

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from autocompress.accounting import model_footprint
from autocompress.data import calibration_data
from autocompress.errors import AutocompressError
from autocompress.plan import LayerConfig
from autocompress.search.optuna_level import Level2, Level2Settings, Reweighting, open_storage
from autocompress.search.problem import Problem
from autocompress.search.space import SearchSpace, spaces_dir
from autocompress.sensitivity.build import build_table, make_proxy

SPACE = str(spaces_dir() / "joint.yaml")


@pytest.fixture(scope="module")
def problem(tiny_loaded):
    calib = calibration_data(tiny_loaded.tokenizer, None, 2, 0, 64)
    space = SearchSpace.from_yaml(SPACE)
    table = build_table(tiny_loaded, space, make_proxy("fisher"), calib.calib, calib.digest,
                        progress=False, log=lambda m: None)
    groups = space.decision_groups(tiny_loaded.layers)
    sizes = Problem(table, groups, 10**12)
    capacity = int(sizes.min_bytes * 1.6)
    return Problem(table, groups, capacity)


def test_proxy_front_is_monotone(problem):
    front = problem.front(points=5)
    assert len(front) >= 3
    sizes = [problem.layer_bytes(choice) for _, choice in front]
    costs = [problem.predicted(choice) for _, choice in front]
    assert all(s <= problem.capacity for s in sizes)
    order = np.argsort(sizes)
    # more bytes never predicts more loss (each point is the exact optimum at its capacity)
    assert all(costs[order[i]] >= costs[order[i + 1]] - 1e-12 for i in range(len(order) - 1))
    assert front[0][1] == problem.solve()


def test_reweighting_moves_the_solver_away_from_distrusted_options(problem):
    weights = Reweighting(problem)
    assert "w_2bit" in weights.masks and "w_2to4" in weights.masks
    two_bit = problem.option_mask(lambda c: c.bits == 2)
    plain = problem.solve(weights.cost(problem, {}))
    heavy = problem.solve(weights.cost(problem, {"w_2bit": 1e6}))
    count = lambda choice: sum(two_bit[g, o] for g, o in enumerate(choice))  # noqa: E731
    assert count(heavy) <= count(plain)
    assert count(heavy) == 0


def _level2(problem, tmp_path, n, resume=False, measure=None, **kw):
    calls = []

    def fake_measure(configs):  # a deterministic stand-in for the low-fidelity KL
        calls.append(1)
        return sum(8 - min(c.bits, 8) for c in configs.values()) * 1e-3 + 1e-4

    level = Level2(problem, Level2Settings(n_trials=n, seed=0, **kw), measure or fake_measure,
                   describe=lambda configs: (sum(1 for _ in configs), None),
                   budget=10**9, max_latency_s=None, with_latency=False, out_dir=tmp_path,
                   resume=resume, log=lambda m: None, progress=False)
    return level, calls


def test_level2_starts_from_the_proxy_front_and_measures_each_plan_once(problem, tmp_path):
    level, calls = _level2(problem, tmp_path, 12)
    trials = level.run()
    assert len(trials) == 12
    first = level.study.trials[0]
    assert first.params["capacity"] == 1.0 and all(
        v == 1.0 for k, v in first.params.items() if k.startswith("w_"))
    assert first.user_attrs["choice"] == problem.solve()  # trial 0 is the proxy optimum
    signatures = {t.user_attrs["signature"] for t in trials}
    assert len(calls) == len(signatures)  # repeated plans are not measured again
    best = level.best(3)
    assert [b[2] for b in best] == sorted(b[2] for b in best)
    assert len({b[0] for b in best}) == len(best)
    assert (tmp_path / "study.journal").is_file()


def test_level2_seeds_the_corrections_measurements_call_for(problem, tmp_path):
    from autocompress.search.optuna_level import WEIGHT_RANGE

    level, _ = _level2(problem, tmp_path, 16)
    level.run()
    seeds = [t.params for t in level.study.trials if t.user_attrs.get("seed")]
    others = lambda p, knob: all(v == 1.0 for k, v in p.items()  # noqa: E731
                                 if k.startswith("w_") and k != knob)
    assert any(p["w_2bit"] == WEIGHT_RANGE[1] and others(p, "w_2bit") for p in seeds)
    trusting = [t for t in level.study.trials if t.user_attrs.get("seed")
                and t.params["w_gptq"] == WEIGHT_RANGE[0] and others(t.params, "w_gptq")]
    assert len(trusting) == 1 and trusting[0].params["capacity"] == 1.0
    # trusting GPTQ more moves layers to GPTQ options against the proxy optimum
    gptq = problem.option_mask(lambda c: c.method == "gptq")
    count = lambda choice: sum(gptq[g, o] for g, o in enumerate(choice))  # noqa: E731
    assert count(trusting[0].user_attrs["choice"]) > count(problem.solve())


def test_level2_refuses_an_existing_study_without_resume(problem, tmp_path):
    _level2(problem, tmp_path, 2)[0].run()
    with pytest.raises(AutocompressError, match="--resume"):
        _level2(problem, tmp_path, 2)


class _Killed(BaseException):
    """A stand-in for SIGKILL: nothing catches it, so the trials in flight stay RUNNING."""


def _kill_at(count: int, inner):
    """``inner``, raising _Killed on its ``count``-th call."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == count:
            raise _Killed
        return inner(*args, **kwargs)
    return wrapped


def _history(level) -> list[dict]:
    """What the sampler sees: the complete trials' parameters in trial-number order (TPE's
    mixture, weights and tie-breaks depend on the order, not only on the set)."""
    return [t.params for t in level.complete_trials()]


@pytest.mark.parametrize("batch, where, count", [
    (1, "measure_many", 1),  # the first seed: a seed run again must not come after the others
    (1, "measure_many", 10),  # a sampled trial
    (1, "propose", 11),  # half-way through a sampled trial's suggestions
    (3, "record", 8),    # between two tells of one batch
    (3, "propose", 11),  # half-way through a batch's asks
])
def test_a_killed_and_resumed_study_asks_what_an_uninterrupted_one_asks(
        problem, tmp_path, batch, where, count):
    n = 14  # TPE's own suggestions start after 8 complete trials
    reference, _ = _level2(problem, tmp_path / "reference", n, batch=batch)
    reference.run()
    killed, _ = _level2(problem, tmp_path / "run", n, batch=batch)
    setattr(killed, where, _kill_at(count, getattr(killed, where)))
    with pytest.raises(_Killed):
        killed.run()
    running = [t.number for t in killed.study.get_trials(states=(TrialState.RUNNING,))]
    assert running  # the kill left trials in flight
    resumed, _ = _level2(problem, tmp_path / "run", n, resume=True, batch=batch)
    done = resumed.run()
    assert len(done) == n
    assert _history(resumed) == _history(reference)
    assert [t.user_attrs["position"] for t in done] == list(range(n))
    trials = resumed.study.get_trials(deepcopy=False)
    copies = {n: t for t in trials for n in t.user_attrs.get("requeued_from", [])}
    assert sorted(copies) == sorted(t.number for t in trials if t.state == TrialState.FAIL)
    assert set(running) <= set(copies)


def test_rdb_storage_url_is_used_as_given(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert open_storage(url, tmp_path) == url
    assert open_storage(None, None) is None


# -- the whole search, killed and resumed --------------------------------------------------------

def _search_argv(model_dir, out, budget, *extra):
    return ["search", "--model", str(model_dir), "--budget", str(budget), "--out", str(out),
            "--space", SPACE, "--calib-windows", "2", "--window-len", "64", "--context", "256",
            "--fast-windows", "1", "--num-cpus", "2", *extra]


# the driver SIGKILLs itself at the third trial result it receives in level 3: trials
# half-measured, whatever the machine's speed (a kill timed from outside came once after the
# tiny model's whole level 3)
KILL_IN_LEVEL3 = "level3_result:3"


def _start(argv):
    code = ("import sys, torch; torch.set_num_threads(1); from autocompress.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    return subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled",
                                 "AUTOCOMPRESS_FAULT": KILL_IN_LEVEL3})


def _wait_for_the_fault(proc, timeout=240):
    """Waits for the driver to kill itself at its fault point, then kills what it started (the
    local Ray cluster) as a kill of the whole process group would."""
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        code = None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if code != -signal.SIGKILL:
        pytest.fail(f"the search did not reach its fault point (exit code {code})")


def _complete(out):
    try:
        study = optuna.load_study(study_name="autocompress", storage=open_storage(None, out))
    except Exception:
        return []
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _budget(tiny_loaded):
    return model_footprint(tiny_loaded, {l.name: LayerConfig(bits=3) for l in tiny_loaded.layers},
                           context=256).total


@pytest.mark.slow
def test_sigkill_in_level3_then_resume(tiny_loaded, tiny_model_dir, tmp_path):
    import ray

    from autocompress.cli import main

    out = tmp_path / "run"
    argv = _search_argv(tiny_model_dir, out, _budget(tiny_loaded), "--trials", "6",
                        "--eval-top", "2", "--eval-windows", "6")
    proc = _start(argv)
    experiment = out / "level3" / "level3"
    _wait_for_the_fault(proc)
    before = {p.name for p in experiment.iterdir() if p.is_dir()}
    stages_before = json.loads((out / "timings.json").read_text())
    try:
        assert main(argv + ["--resume"]) == 0
    finally:
        ray.shutdown()
    assert len(_complete(out)) == 6  # level 2 was not repeated
    # the stages the killed attempt finished keep their time (the resumed table is a cache
    # read): search.json's figures are what the stages cost in all
    timings = json.loads((out / "search.json").read_text())["timings_s"]
    assert set(stages_before) == {"sensitivity_s", "level1_s", "level2_s"}
    assert all(timings[k] >= v for k, v in stages_before.items())
    assert timings["level3_s"] > 0
    after = {p.name for p in experiment.iterdir() if p.is_dir()}
    assert before <= after  # the interrupted trials were continued, not replaced
    search = json.loads((out / "search.json").read_text())
    candidates = [name.split("candidate=")[1].split("_")[0] for name in after]
    assert len(candidates) == len(set(candidates)) == len(search["candidates"])
    measured = [c["measured"] for c in search["candidates"]]
    assert all(m["windows"] == 6 or m["stopped_early"] for m in measured)
    assert all(m["tokens"] == 63 * m["windows"] for m in measured)
    memory = search["memory"]  # the workers' own high-water marks, and the driver's
    assert 50e6 < memory["worker_peak_rss_bytes"] < 64 * 2**30
    assert 50e6 < memory["peak_rss_bytes"] < 64 * 2**30


def test_a_resume_hides_tunes_warning_about_a_killed_drivers_missing_files_only():
    """After a kill, restoring Tune's experiment may warn that a trial's result files are
    missing (seen here on both resumes tried of test_sigkill_in_level3_then_resume's run);
    level 3 reads each trial's last result from the experiment's state, so the warning would
    only alarm. Any other warning of that logger still shows."""
    import inspect
    import logging

    import ray.tune.analysis.experiment_analysis as analysis

    from autocompress.search.tune_level import _without_missing_files_warnings

    # the text the filter matches is the one this Ray version writes
    assert 'f"Failed to fetch metrics' in inspect.getsource(analysis.ExperimentAnalysis)
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    analysis.logger.addHandler(handler)
    missing = "Failed to fetch metrics for 1 trial(s):\n- t: FileNotFoundError('...')"
    try:
        with _without_missing_files_warnings():
            analysis.logger.warning(missing)
            analysis.logger.warning("another warning")
        analysis.logger.warning(missing)  # outside level 3's fit, nothing is filtered
    finally:
        analysis.logger.removeHandler(handler)
    assert seen == ["another warning", missing]


def test_resuming_a_study_made_for_other_settings_is_refused(problem, tmp_path):
    level, _ = _level2(problem, tmp_path, 2)
    level.run()
    other = Problem(problem.table, problem.groups, problem.capacity - 1)
    with pytest.raises(AutocompressError, match="other settings .*capacity"):
        Level2(other, Level2Settings(n_trials=2), lambda c: 0.0, lambda c: (0, None),
               budget=10**9, max_latency_s=None, with_latency=False, out_dir=tmp_path,
               resume=True, log=lambda m: None, progress=False)


def test_level2_uses_only_optunas_public_api():
    """Private attributes (study._storage, trial._trial_id) and raw system_attrs change between
    Optuna releases without notice."""
    from pathlib import Path

    import autocompress.search.optuna_level as level

    source = Path(level.__file__).read_text()
    for private in ("._storage", "._trial_id", "system_attrs", "._cached"):
        assert private not in source, private


def test_a_kill_while_requeueing_loses_no_trial_and_doubles_none(problem, tmp_path):
    """Resuming enqueues a copy of each interrupted trial, then marks it failed; a process
    killed between the two leaves both the RUNNING trial and its copy, and the next resume
    runs that position once (and, the other way round, could not lose it)."""
    n = 10
    reference, _ = _level2(problem, tmp_path / "reference", n)
    reference.run()
    killed, _ = _level2(problem, tmp_path / "run", n)
    killed.measure_many = _kill_at(2, killed.measure_many)  # the second seed, while measured
    with pytest.raises(_Killed):
        killed.run()
    tell = optuna.Study.tell
    try:  # the resume killed as it marks the original failed, after enqueueing the copy
        optuna.Study.tell = _kill_at(1, tell)
        with pytest.raises(_Killed):
            _level2(problem, tmp_path / "run", n, resume=True)
    finally:
        optuna.Study.tell = tell
    study = optuna.load_study(study_name="autocompress",
                              storage=open_storage(None, tmp_path / "run"))
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states.count(TrialState.RUNNING) == 1 and states.count(TrialState.WAITING) == 1
    resumed, _ = _level2(problem, tmp_path / "run", n, resume=True)
    done = resumed.run()
    assert _history(resumed) == _history(reference)
    assert [t.user_attrs.get("seed_index") for t in done].count(1) == 1
    trials = resumed.study.get_trials(deepcopy=False)
    claims = [n for t in trials for n in t.user_attrs.get("requeued_from", [])]
    assert sorted(claims) == sorted(t.number for t in trials if t.state == TrialState.FAIL)
    assert len(claims) == len(set(claims))  # each failed trial run again once
