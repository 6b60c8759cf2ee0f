"""experiments/studies.py's hand-over: a stopped study leaves its resume state (not its
gigabytes of statistics) in the results tree, and a checkout without the work directory goes
on from it; a finished one removes it."""

from __future__ import annotations

import importlib
import json
import shutil
import signal
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))
studies = importlib.import_module("studies")
sys.path.remove(str(EXPERIMENTS))


class FakeStudy:
    """Stands in for the `autocompress study` process: records its command line, does
    ``work(out)`` and exits with ``code``."""

    def __init__(self, work, code):
        self.work, self.code, self.commands = work, code, []

    def __call__(self, command):
        self.commands.append(command)
        self.work(Path(command[command.index("--out") + 1]))
        return self

    def wait(self):
        return self.code

    def send_signal(self, signum):
        pass


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    monkeypatch.setattr(studies, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(studies, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(studies, "COMMANDS", {"proxies": lambda: ["study", "proxies"]})
    return tmp_path


def _stopped_half_way(out: Path) -> None:
    (out / "tables").mkdir(parents=True)
    (out / "stats").mkdir()
    (out / "proxies.json").write_text(json.dumps({"models": {"a": {"plans": {"q/0": 1}}}}))
    (out / ".autocompress.json").write_text('{"entries": []}')
    (out / "tables" / "a-fisher.cache.json").write_text('{"rows": {"l0": 1}}')
    (out / "stats" / "block0.safetensors").write_bytes(b"H" * 64)


def test_a_stopped_study_goes_on_from_the_results_tree_on_a_fresh_checkout(dirs, monkeypatch):
    first = FakeStudy(_stopped_half_way, code=143)
    monkeypatch.setattr(studies.subprocess, "Popen", first)
    with pytest.raises(SystemExit) as stopped:
        studies.run("proxies")
    assert stopped.value.code == 143
    kept = dirs / "results" / "studies" / "proxies" / "in-progress"
    assert sorted(str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file()) == [
        ".autocompress.json", "proxies.json", "tables/a-fisher.cache.json"]  # no statistics
    assert "--resume" not in first.commands[0]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the forwarding is undone

    shutil.rmtree(dirs / "runs")  # another machine: the work directory is gone

    def finish(out: Path) -> None:
        # what the study resumes from is what the stopped one saved
        assert json.loads((out / "proxies.json").read_text())["models"]["a"]["plans"] == {
            "q/0": 1}
        assert (out / "tables" / "a-fisher.cache.json").read_text() == '{"rows": {"l0": 1}}'
        (out / "proxies.csv").write_text("model\n")

    second = FakeStudy(finish, code=0)
    monkeypatch.setattr(studies.subprocess, "Popen", second)
    studies.run("proxies")
    assert "--resume" in second.commands[0]
    assert not kept.exists()  # finished: nothing left to go on from
    results = dirs / "results" / "studies" / "proxies"
    assert (results / "proxies.csv").is_file() and (results / "proxies.json").is_file()
    assert not (results / "tables").exists()  # caches are inputs, not results
