"""Level 3 on a real two-node Ray cluster on this machine: a head and a second node started
with `ray start` on loopback, each with one CPU, joined by `search --address`."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from autocompress.accounting import model_footprint
from autocompress.plan import LayerConfig

RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(temp_dir: str) -> None:
    """Only this cluster's processes (`ray stop` would stop every Ray on the machine): theirs
    are the command lines that name its temp dir."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in proc.info["cmdline"] or []):
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


def _ray_start(args: list[str], env: dict) -> None:
    done = subprocess.run([RAY, "start", *args], check=False, env=env, capture_output=True,
                          text=True, timeout=120)
    if done.returncode != 0:  # Ray's own words on why, not only its exit status
        pytest.fail(f"ray start {' '.join(args)} failed:\n{(done.stdout + done.stderr)[-3000:]}")


def _auth_mode(monkeypatch) -> str:
    """One authentication mode for the head, the second node and every driver. Left unset,
    Ray decides per command: a local ray.init() turns token mode on (and writes
    ~/.ray/auth_token), `ray start --head` turns it on when that file exists, and
    `ray start --address` leaves it off, so the second node could not join its head. This
    process keeps the mode it has (it caches it); a process that has none takes token mode,
    as Ray's own local clusters do, with a token made if there is none."""
    mode = os.environ.get("RAY_AUTH_MODE") or "token"
    # set before Ray reads it, then Ray's config reloaded, as Ray does when it turns token mode
    # on itself: a process that imported Ray has read the mode once already
    monkeypatch.setenv("RAY_AUTH_MODE", mode)  # for the drivers this test starts, too
    from ray._private.authentication.authentication_token_setup import (
        _get_default_token_path,
        generate_and_save_token,
    )
    from ray._raylet import Config

    Config.initialize("")
    if mode == "token" and not os.environ.get("RAY_AUTH_TOKEN") \
            and not _get_default_token_path().exists():
        generate_and_save_token()
    return mode


@pytest.fixture
def two_nodes(monkeypatch):
    # a short temp dir of its own: Unix socket paths are limited to 107 bytes, and a default
    # one (/tmp/ray) would be found and joined by the in-process Ray of other tests
    temp_dir = f"/tmp/ac-ray-{os.getpid()}"
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": _auth_mode(monkeypatch)}
    common = ["--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats"]
    try:
        _ray_start(["--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                    "--include-dashboard", "false", "--temp-dir", temp_dir, *common], env)
        _ray_start(["--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1",
                    *common], env)
        yield f"127.0.0.1:{port}"
    finally:
        _stop(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _node_ids(experiment: Path) -> set[str]:
    nodes = set()
    for result in experiment.glob("*/result.json"):
        for line in result.read_text().splitlines():
            if line.strip():
                nodes.add(json.loads(line)["node"])
    return nodes


@pytest.mark.slow
def test_a_search_through_address_measures_its_candidates_on_both_nodes(
        two_nodes, tiny_loaded, tiny_model_dir, tmp_path):
    import ray

    from autocompress.cli import main

    budget = model_footprint(tiny_loaded, {l.name: LayerConfig(bits=3)
                                           for l in tiny_loaded.layers}, context=256).total
    out = tmp_path / "run"
    try:
        code = main(["search", "--model", str(tiny_model_dir), "--budget", str(budget),
                     "--context", "256", "--calib-windows", "2", "--window-len", "64",
                     "--trials", "2", "--eval-top", "2", "--eval-windows", "4",
                     "--address", two_nodes, "--num-cpus", "1", "--out", str(out)])
        assert code == 0
        assert len(ray.nodes()) == 2
    finally:
        ray.shutdown()
    search = json.loads((out / "search.json").read_text())
    measured = [c["measured"] for c in search["candidates"]]
    assert len(measured) >= 2 and all(m["tokens"] == 63 * m["windows"] for m in measured)
    # two one-CPU trials at a time on two one-CPU nodes: each node measured some
    assert len(_node_ids(out / "level3" / "level3")) == 2


@pytest.mark.slow
def test_a_search_killed_in_level3_on_the_cluster_resumes_there(two_nodes, tiny_loaded,
                                                                 tiny_model_dir, tmp_path):
    """SIGKILL of the driver while the cluster measures; `--resume --address` continues the
    Tune experiment on the same cluster (waiting, if it must, for the dead driver's trials to
    free their CPUs) and repeats no level-2 trial."""
    from tests.search.test_levels import (KILL_IN_LEVEL3, _budget, _complete, _search_argv,
                                          _wait_for_the_fault)

    out = tmp_path / "run"
    argv = _search_argv(tiny_model_dir, out, _budget(tiny_loaded), "--trials", "6",
                        "--eval-top", "2", "--eval-windows", "6", "--address", two_nodes,
                        "--num-cpus", "1")
    experiment = out / "level3" / "level3"
    command = [sys.executable, "-m", "autocompress.cli", *argv]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True,
                              env={**os.environ, "AUTOCOMPRESS_FAULT": KILL_IN_LEVEL3})
    _wait_for_the_fault(driver)
    # in a process of its own with a time limit: a resume that waits on the cluster fails
    # this test instead of hanging the suite
    resumed = subprocess.run(command + ["--resume"], check=False, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "restoring the Ray Tune experiment" in resumed.stdout + resumed.stderr
    assert len(_complete(out)) == 6
    measured = [c["measured"] for c in json.loads((out / "search.json").read_text())["candidates"]]
    assert all(m["windows"] == 6 or m["stopped_early"] for m in measured)
    assert len(_node_ids(experiment)) == 2


def test_a_cluster_without_a_free_cpu_is_a_clear_error_not_a_hang(monkeypatch):
    import ray

    from autocompress.errors import AutocompressError
    from autocompress.search.ray_cluster import wait_for_cpus

    lines = []
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 1.0})
    wait_for_cpus(1, "127.0.0.1:1", timeout_s=0.0, log=lines.append)  # free: no wait
    assert lines == []
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 0.0})
    with pytest.raises(AutocompressError, match="fewer than 1 free CPU.*--resume"):
        wait_for_cpus(1, "127.0.0.1:1", timeout_s=0.2, log=lines.append)
    assert len(lines) == 1 and "waiting for 1 free CPU" in lines[0]
