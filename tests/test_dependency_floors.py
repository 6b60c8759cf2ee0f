"""The floors in pyproject.toml are the first releases with what the code calls. Each row names
an API this code uses and the release that introduced it (checked against release notes and the
released sources when the floor was set); a floor below it fails, and so does a row whose API the
installed version no longer has (the row would be stale)."""

import importlib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

# (distribution, the code's use, module to import, attribute path, first release with it)
NEEDS = [
    ("optuna", "Trial.set_constraint (search/optuna_level.py)", "optuna", "Trial.set_constraint",
     "5.0"),
    ("optuna", "FrozenTrial.constraints (search/optuna_level.py)", "optuna.trial",
     "FrozenTrial.constraints", "5.0"),
    ("ray", "ray.tune.report / get_checkpoint / Checkpoint (search/tune_level.py)", "ray.tune",
     "get_checkpoint", "2.41"),
    ("accelerate", "what transformers 5 imports to load any model", "accelerate.utils.modeling",
     "get_module_size_with_ties", "1.2"),
    ("transformers", "from_pretrained(..., gguf_file=) of the v5 API", "transformers",
     "AutoModelForCausalLM", "5.0"),
    ("scipy", "optimize.milp (search/exact.py)", "scipy.optimize", "milp", "1.10"),
    ("pydantic", "the v2 API (hardware/profile.py)", "pydantic", "model_validator", "2.0"),
]


def _floors() -> dict[str, Version]:
    data = tomllib.loads(PYPROJECT.read_text())
    reqs = data["project"]["dependencies"] + \
        [r for extra in data["project"]["optional-dependencies"].values() for r in extra]
    floors = {}
    for text in reqs:
        req = Requirement(text)
        for spec in req.specifier:
            if spec.operator == ">=":
                floors[req.name] = max(floors.get(req.name, Version("0")), Version(spec.version))
    return floors


@pytest.mark.parametrize("dist, use, module, attribute, first", NEEDS,
                         ids=[f"{n[0]}:{n[3]}" for n in NEEDS])
def test_floor_is_at_least_the_release_the_code_needs(dist, use, module, attribute, first):
    floors = _floors()
    assert dist in floors, f"{dist} has no floor in pyproject.toml"
    assert floors[dist] >= Version(first), \
        f"{dist}>={floors[dist]} but the code uses {use}, new in {first}"
    target = importlib.import_module(module)
    for part in attribute.split("."):
        target = getattr(target, part)  # the installed version has it: the row is current


def test_onnxruntime_floor_runs_two_bit_matmulnbits():
    """2-bit MatMulNBits (the runtime's 2-bit layers) first ran on the CPU in 1.24.1."""
    assert _floors()["onnxruntime"] >= Version("1.24.1")
