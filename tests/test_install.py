"""A real install works: the bundled spaces and device profiles are package data of the wheel.

An editable install (what `make install` does) reads them from the checkout, so it cannot show
that a wheel lacks them; this builds the wheel, installs it into a fresh environment outside the
checkout and runs the CLI from another directory (.ci/wheel_check.sh, also run by .ci/run).
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "autocompress"


def test_package_data_declares_every_bundled_file():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["autocompress"]
    bundled = [p.relative_to(PACKAGE).as_posix()
               for folder in ("search_spaces", "hw_profiles") for p in (PACKAGE / folder).iterdir()
               if p.is_file()]
    assert {"search_spaces/joint.yaml", "search_spaces/bits.yaml"} <= set(bundled)
    missing = [f for f in bundled if not any(fnmatch.fnmatch(f, pat) for pat in patterns)]
    assert not missing, f"not declared as package data in pyproject.toml: {missing}"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("tar") is None,
                    reason="the check is a bash script")
def test_the_wheel_installs_and_runs_outside_the_checkout():
    script = REPO / ".ci" / "wheel_check.sh"
    proc = subprocess.run(["bash", str(script)], env={**os.environ, "VENV": sys.prefix},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    for step in ("devices", "plan", "estimate", "spaces"):
        assert f"wheel_check: {step} ok" in proc.stdout
