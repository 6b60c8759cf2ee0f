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


@pytest.fixture
def two_nodes():
    # a short temp dir of its own: Unix socket paths are limited to 107 bytes, and a default
    # one (/tmp/ray) would be found and joined by the in-process Ray of other tests
    temp_dir = f"/tmp/ac-ray-{os.getpid()}"
    port = _free_port()
    # Ray's default authentication, as the in-process drivers of the other tests have it (a
    # process caches its auth mode: one that set RAY_AUTH_MODE differently cannot join)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats"]
    try:
        subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1",
                        "--port", str(port), "--include-dashboard", "false",
                        "--temp-dir", temp_dir, *common], check=True, env=env,
                       capture_output=True, timeout=120)
        subprocess.run([RAY, "start", "--address", f"127.0.0.1:{port}",
                        "--node-ip-address", "127.0.0.1", *common], check=True, env=env,
                       capture_output=True, timeout=120)
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
