"""The fault drill: a small search on the tiny model, SIGKILLed at 20 random moments across the
sensitivity table, levels 1-3 and the file writes, each followed by ``--resume``; and SIGINT or
SIGTERM at random moments. After every kill, every file in ``--out`` is absent or complete;
after every resume that finishes, the plan equals an uninterrupted run's (same seed) and the
study holds the same trials, none lost or repeated.

Kills come two ways: at fault points (autocompress/faults.py: half-way through an atomic
write, between a trial's measurement and its record, between sensitivity rows, between final
measurements), which a timer would hit only by luck, and by a timer at a random delay. The
level-3 Ray Tune experiment's own kill-and-restore is drilled in tests/search/test_levels.py
(each Ray trial starts a process, which would make 20 kills there take many minutes).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autocompress.outputs import MARKER, TMP_TAG
from autocompress.search.optuna_level import STUDY_NAME, open_storage

pytestmark = pytest.mark.slow

N_TRIALS = 12
KILLS = 20
LAYERS = 14  # block linears of the tiny model: one sensitivity row each


def _argv(model_dir: Path, out: Path) -> list[str]:
    return ["search", "--model", str(model_dir), "--budget", "250KB", "--context", "64",
            "--bits", "2,3,4,8", "--calib-windows", "2", "--holdout-windows", "4",
            "--window-len", "64", "--trials", str(N_TRIALS), "--eval-top", "0",
            "--seed", "3", "--out", str(out)]


# every run that reaches its end measures its first candidate first (eval-top 0, nothing of
# the final measurement is kept across a kill)
TIMER_BACKSTOP = "final_measure:1"


def _start(argv: list[str], fault: str | None = None) -> subprocess.Popen:
    # the program's own entry point, as the console script runs it: nothing heavy before its
    # signal handlers are in place (a fraction of a second), and signals stay handled through
    # the second or so Python takes to exit (one thread, as the tiny-model tests run)
    code = "import sys; from autocompress.cli import run; sys.exit(run())"
    env = {k: v for k, v in os.environ.items() if k != "AUTOCOMPRESS_FAULT"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if fault:
        env["AUTOCOMPRESS_FAULT"] = fault
    return subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=env,
                            preexec_fn=_ctrl_c_as_at_a_terminal)


def _ctrl_c_as_at_a_terminal() -> None:
    """A suite started in the background (``cmd &`` in a script) inherits SIGINT ignored, and
    so would the program, as POSIX asks of background jobs: the drill wants it as at a
    terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _what_counts(out: Path) -> dict:
    plan = json.loads((out / "plan.json").read_text())
    study = optuna.load_study(study_name=STUDY_NAME, storage=open_storage(None, out))
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return {"default": plan["default"], "overrides": plan["overrides"],
            "provenance": plan["provenance"], "chosen": plan["figures"]["chosen"],
            "kl": plan["figures"]["holdout"]["reported"]["kl"],
            "trials": sorted(json.dumps(t.params, sort_keys=True) for t in complete)}


def _assert_whole(out: Path) -> None:
    """Every file in --out is absent or complete; half-made files exist only as temporaries."""
    if not out.exists():
        return
    for path in out.iterdir():
        if path.name.startswith(".") and (path.name.endswith(".tmp") or TMP_TAG in path.name):
            continue  # a temporary, removed by the next run
        if path.suffix == ".json" or path.name == MARKER:
            json.loads(path.read_text())
        elif path.suffix == ".png":
            data = path.read_bytes()
            assert data.startswith(b"\x89PNG") and data.endswith(b"IEND\xaeB`\x82"), path
        elif path.suffix == ".csv":
            assert path.read_text().endswith("\n"), path
    if (out / "study.journal").exists():
        optuna.load_study(study_name=STUDY_NAME, storage=open_storage(None, out)).get_trials()


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("drill") / "reference"
    start = time.perf_counter()
    proc = _start(_argv(tiny_model_dir, out))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return _what_counts(out), time.perf_counter() - start


# one search's ten kills, in the order its stages come (a kill for a stage already passed moves
# to the stage reached): sensitivity rows and writes, level-2 trials, final measurements and
# the final writes, timers. Each kind has its own slot, so that every kind is drilled whatever
# the timing (drawn at random between kinds, the timers' stages decided which came up)
ROUND = (("sensitivity", "row"), ("sensitivity", "write"), ("timer", None),
         ("level2", "trial"), ("level2", "trial"), ("level2", "trial"), ("timer", None),
         ("final", "measure"), ("final", "write"), ("timer", None))


def _stage(out: Path) -> str:
    if not (out / "sensitivity.json").exists():
        return "sensitivity"
    if not (out / "study.journal").exists() or _complete(out) < N_TRIALS:
        return "level2"
    return "final"


def _kill_for(want: str, kind: str | None, out: Path, rng: random.Random, wall: float
              ) -> tuple[str | None, float | None]:
    """The fault (or timer) for a kill of ``kind`` in stage ``want``, given where the search
    is. A run's atomic writes come in this order: the output marker, one per new sensitivity
    row, sensitivity.json, then (after the final measurements) plan.json, search.json and the
    Pareto files."""
    if want == "timer":
        return None, rng.uniform(2.0, wall)
    if want == "sensitivity":
        cache = out / "sensitivity.cache.json"
        left = LAYERS - (len(json.loads(cache.read_text())["rows"]) if cache.exists() else 0)
        if kind == "row":
            return f"sensitivity_row:{rng.randint(1, left)}", None
        return f"atomic_write:{rng.randint(2, left + 1)}", None
    if want == "level2":
        left = N_TRIALS - (_complete(out) if (out / "study.journal").exists() else 0)
        return f"level2_trial:{rng.randint(1, left)}", None
    if kind == "measure" or _stage(out) != "final":  # counted from before the final stage,
        return f"final_measure:{rng.randint(1, 2)}", None  # the writes would fall in another
    return f"atomic_write:{rng.randint(3, 7)}", None


def _complete(out: Path) -> int:
    study = optuna.load_study(study_name=STUDY_NAME, storage=open_storage(None, out))
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def test_twenty_sigkills_then_resume_give_the_uninterrupted_plan(reference, tiny_model_dir,
                                                                 tmp_path):
    expected, wall = reference
    rng = random.Random(16)
    where: list[str] = []
    order = ["sensitivity", "level2", "final"]
    for round_ in range(KILLS // len(ROUND)):
        out = tmp_path / f"round{round_}"
        for want, kind in ROUND:
            if want != "timer" and order.index(want) < order.index(_stage(out)):
                want, kind = _stage(out), {"level2": "trial", "final": "measure"}[_stage(out)]
            fault, delay = _kill_for(want, kind, out, rng, wall)
            # a timer drawn after what is left of the run would let it finish (the test then
            # has nothing to resume): the first final measurement stops it first
            proc = _start(_argv(tiny_model_dir, out) + ["--resume"], fault or TIMER_BACKSTOP)
            try:
                _, err = proc.communicate(timeout=delay or 600)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                _, err = proc.communicate()
            assert proc.returncode == -signal.SIGKILL, (fault, where, err)
            where.append(fault or f"timer {delay:.1f}s (or {TIMER_BACKSTOP})")
            _assert_whole(out)
        proc = _start(_argv(tiny_model_dir, out) + ["--resume"])
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        assert _what_counts(out) == expected, where
        study = optuna.load_study(study_name=STUDY_NAME, storage=open_storage(None, out))
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        assert len(complete) == N_TRIALS
        trials = study.get_trials(deepcopy=False)
        rerun = {}
        for t in trials:
            for number in t.user_attrs.get("requeued_from", []):
                assert number not in rerun  # run again once, not twice
                rerun[number] = t
        for failed in (t for t in trials if t.state == TrialState.FAIL):
            again = rerun[failed.number]  # each interrupted trial ran again (perhaps itself
            while again.state == TrialState.FAIL:  # killed, and run again in turn) until it
                again = rerun[again.number]  # completed
            assert again.state == TrialState.COMPLETE
        leftovers = [p.name for p in out.iterdir() if TMP_TAG in p.name or p.name.endswith(".tmp")]
        assert not leftovers
    assert len(where) == KILLS
    stages = {w.split(":")[0] for w in where}
    assert {"sensitivity_row", "level2_trial", "atomic_write", "final_measure"} <= stages, where


def test_sigint_and_sigterm_at_random_moments_end_with_one_line(reference, tiny_model_dir,
                                                               tmp_path):
    expected, wall = reference
    rng = random.Random(7)
    out = tmp_path / "run"
    argv = _argv(tiny_model_dir, out) + ["--resume"]
    codes = []
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
        proc = _start(argv)
        time.sleep(rng.uniform(1.0, wall * 0.8))
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        lines = [l for l in err.replace("\r", "\n").splitlines()
                 if l.strip() and "it/s" not in l and "it]" not in l]
        assert "Traceback" not in err, err
        if proc.returncode == 0:
            codes.append(0)
            continue
        assert proc.returncode == (130 if sig == signal.SIGINT else 143), err
        assert lines[-1].startswith("interrupted" if sig == signal.SIGINT else "terminated")
        assert sum(1 for l in lines if "interrupted" in l or "terminated" in l) == 1, err
        codes.append(proc.returncode)
        _assert_whole(out)
    assert {130, 143} <= set(codes), codes
    proc = _start(argv)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert _what_counts(out) == expected
