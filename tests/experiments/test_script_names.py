"""The benchmark scripts import each other by bare name (experiments/ on sys.path), so none may
share a name with an installed package: experiments/kernels.py once shadowed Hugging Face's
``kernels``, and every transformers model import after it failed."""

import importlib.util
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def test_no_script_shadows_an_installed_module():
    others = [p for p in sys.path if Path(p or ".").resolve() != EXPERIMENTS]
    clashes = []
    for script in sorted(EXPERIMENTS.glob("*.py")):
        name = script.stem
        if name in sys.builtin_module_names:
            clashes.append(name)
            continue
        spec = importlib.machinery.PathFinder.find_spec(name, others)
        if spec is not None and Path(spec.origin or "").resolve().parent != EXPERIMENTS:
            clashes.append(f"{name} ({spec.origin})")
    assert clashes == []
