"""Optional dependencies (pyproject's extras): a missing one is one line naming the extra."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from autocompress.compress.weights import compress_weight
from autocompress.errors import AutocompressError
from autocompress.optional import EXTRAS, available, require
from autocompress.plan import LayerConfig
from autocompress.runtime.cpu_kernels import TorchUnpackKernel
from autocompress.runtime.modules import make_kernel
from autocompress.runtime.packed import PackedLinear

REPO = Path(__file__).resolve().parents[1]


def _block(monkeypatch, module: str) -> None:
    """Make ``import module`` fail as if it were not installed (None in sys.modules)."""
    for name in [n for n in sys.modules if n == module or n.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)


def _matrix():
    cfg = LayerConfig(bits=4, group_size=32)
    weight = compress_weight(torch.randn(16, 64, generator=torch.Generator().manual_seed(0)), cfg)
    return PackedLinear.from_compressed(weight, cfg).matrices[0]


def test_require_names_the_extra_in_one_line(monkeypatch):
    _block(monkeypatch, "triton")
    assert not available("triton")
    with pytest.raises(AutocompressError) as info:
        require("triton", "gpu", "the triton backend")
    assert str(info.value) == "the triton backend needs triton: pip install 'autocompress[gpu]'"
    assert info.value.exit_code == 2


def test_require_returns_the_module_when_installed():
    assert require("yaml", "all", "reading profiles").safe_load("a: 1") == {"a": 1}


def test_a_broken_install_is_not_reported_as_missing(tmp_path, monkeypatch):
    (tmp_path / "halfthere.py").write_text("import not_installed_anywhere_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(AutocompressError, match="halfthere, which is installed but does not "
                                                "import .*not_installed_anywhere_xyz"):
        require("halfthere", "all", "this")


@pytest.mark.parametrize("module, backend, extra", [("triton", "triton", "gpu"),
                                                    ("onnxruntime", "ort", "runtime")])
def test_a_backend_named_without_its_package_says_which_extra(monkeypatch, module, backend,
                                                              extra):
    matrix = _matrix()
    _block(monkeypatch, module)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # no GPU needed to get that far
    with pytest.raises(AutocompressError) as info:
        make_kernel(matrix, backend, layer="model.layers.0.mlp.down_proj")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"the {backend} backend needs {module}: "
                              f"pip install 'autocompress[{extra}]'")
    assert "model.layers.0.mlp.down_proj" in message


def test_auto_backend_runs_without_the_optional_packages(monkeypatch):
    matrix = _matrix()
    _block(monkeypatch, "onnxruntime")
    _block(monkeypatch, "triton")
    kernel = make_kernel(matrix, "auto")
    assert isinstance(kernel, TorchUnpackKernel)
    x = torch.randn(2, 64)
    assert kernel(x).shape == (2, 16)


def test_every_extra_named_in_messages_is_declared():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for module, extra in EXTRAS.items():
        assert any(req.startswith(module) for req in extras[extra]), (module, extra)
        assert any(req.startswith(module) for req in extras["all"]), module
