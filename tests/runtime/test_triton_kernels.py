"""Triton kernels under the interpreter (TRITON_INTERPRET=1, CPU tensors) against
x @ (dequantized packed weight).T: odd shapes, outputs poisoned with NaN before each run and
every element checked. Shapes are small: the interpreter runs programs one by one in numpy."""

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined (@triton.jit reads it)

import pytest  # noqa: E402
import torch  # noqa: E402

from autocompress.compress.weights import compress_weight  # noqa: E402
from autocompress.errors import AutocompressError  # noqa: E402
from autocompress.plan import LayerConfig  # noqa: E402
from autocompress.runtime.packed import PackedLinear  # noqa: E402

pytest.importorskip("triton")

_module = "autocompress.runtime.triton.kernels"
if _module in sys.modules and not sys.modules[_module].INTERPRETED:
    importlib.reload(sys.modules[_module])  # imported earlier without the interpreter
from autocompress.runtime.triton import kernels  # noqa: E402

TWO_FOUR = dict(pattern="2:4", sparsity=0.5, prune_method="magnitude")
CASES = [  # (bits, group, sym, extra), every width and layout at least once
    (2, 32, False, {}), (3, 32, False, {}), (4, -1, True, {}), (8, 32, True, {}),
    (5, 32, False, {}), (6, -1, False, {}),
    (4, 32, False, TWO_FOUR), (3, -1, True, TWO_FOUR), (2, 32, True, TWO_FOUR),
    (8, 32, False, TWO_FOUR),
]


def packed_matrix(shape, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g)
    w[0] = w[0].abs() + 0.5  # zero points outside [0, 2^b - 1]
    return PackedLinear.from_compressed(compress_weight(w, cfg), cfg).matrices[0]


def check(matrix, m_rows, kind, seed=0):
    x = torch.randn(m_rows, matrix.in_features, generator=torch.Generator().manual_seed(seed))
    ref = x.double() @ matrix.dequantize().double().T
    y = torch.full((m_rows, matrix.out_features), float("nan"))
    kernels.packed_matmul(x, matrix, out=y, kind=kind)
    assert not torch.isnan(y).any(), "some output element was never written"
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_kernels_are_interpreted():
    assert kernels.INTERPRETED


@pytest.mark.parametrize("bits,group,sym,extra", CASES,
                         ids=[f"{b}b-g{g}-{'sym' if s else 'asym'}{'-2:4' if e else ''}"
                              for b, g, s, e in CASES])
def test_gemv_and_gemm(bits, group, sym, extra):
    # 19 and 37 outputs: partial tiles of 16; 72 inputs: a partial K tile and a ragged group
    matrix = packed_matrix((19, 72), LayerConfig(bits=bits, group_size=group, sym=sym, **extra))
    check(matrix, 1, "gemv")
    check(matrix, 3, "gemv", seed=1)  # several rows through the GEMV grid's second axis
    check(matrix, 18, "gemm", seed=2)  # two M tiles, the second partial


@pytest.mark.parametrize("shape", [(37, 44), (5, 200)])
def test_random_odd_shapes(shape):
    gen = torch.Generator().manual_seed(shape[0])
    for bits in (2, 3, 4, 8):
        group = [32, 64, -1][int(torch.randint(0, 3, (1,), generator=gen))]
        matrix = packed_matrix(shape, LayerConfig(bits=bits, group_size=group), seed=bits)
        check(matrix, 1, "gemv", seed=bits)
        check(matrix, 5, "gemm", seed=bits)


def test_unsupported_formats_fail_in_one_line():
    from autocompress.runtime.modules import QuantLinear

    cfg = LayerConfig(bits=4, sparsity=0.3, prune_method="magnitude")
    packed = PackedLinear.from_compressed(compress_weight(torch.randn(8, 64), cfg), cfg)
    with pytest.raises(AutocompressError) as info:
        QuantLinear(packed, backend="triton", name="blk.0.up")
    assert "bitmap" in str(info.value) and "blk.0.up" in str(info.value)
    assert "\n" not in str(info.value)


def test_quant_linear_on_the_triton_backend():
    from autocompress.runtime.modules import QuantLinear

    cfg = LayerConfig(bits=3, group_size=32, rank_ratio=0.5)
    packed = PackedLinear.from_compressed(compress_weight(torch.randn(24, 40), cfg), cfg)
    layer = QuantLinear(packed, backend="triton")
    assert layer.backend == "triton+triton"
    x = torch.randn(2, 1, 40)
    torch.testing.assert_close(layer(x), x @ packed.dequantize().T, rtol=1e-4, atol=1e-4)


def test_gpu_benchmark_script_runs_and_checks_its_results(tmp_path):
    """experiments/kernels_gpu.py waits for a lent GPU; its --smoke mode keeps it working."""
    import json
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "kernels_gpu.json"
    run = subprocess.run(
        [sys.executable, str(repo / "experiments" / "kernels_gpu.py"), "--smoke",
         "--shapes", "24x64", "--bits", "3,4", "--out", str(out)],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["bits"], r["layout"]) for r in rows} == {(3, "dense"), (4, "dense"),
                                                        (3, "2:4"), (4, "2:4")}
    assert all(r["bytes"] > 0 and r["gemv_us"] > 0 for r in rows)
    no_gpu = subprocess.run([sys.executable, str(repo / "experiments" / "kernels_gpu.py")],
                            env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
                            capture_output=True, text=True, timeout=300)
    if not torch.cuda.is_available():
        assert no_gpu.returncode != 0 and "needs a CUDA GPU" in no_gpu.stderr
