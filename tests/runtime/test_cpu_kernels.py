"""CPU kernels against x @ (dequantized packed weight).T.

The torch kernel multiplies in float32: float tolerance. ONNX Runtime's MatMulNBits at
accuracy_level 4 quantizes the activations to int8 per block (MLAS's "CompInt8" path), so its
outputs differ from the float product by about 0.5-1% of their largest magnitude; the tests
allow 2% (ORT_INT8_RTOL). At accuracy_level 0 it is float-exact.
"""

import itertools

import pytest
import torch

from autocompress.compress.weights import compress_weight
from autocompress.errors import AutocompressError
from autocompress.plan import LayerConfig
from autocompress.runtime.cpu_kernels import OrtMatMulNBitsKernel, TorchUnpackKernel
from autocompress.runtime.packed import PackedLinear

ORT_INT8_RTOL = 2e-2


def packed_matrix(shape, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g)
    w[0] = w[0].abs() + 0.5  # all-positive row: asymmetric zero points below 0
    w[-1] = -w[-1].abs() - 0.5  # all-negative row: zero points above 2^b - 1
    return PackedLinear.from_compressed(compress_weight(w, cfg), cfg).matrices[0]


def reference(x, matrix):
    return (x.double() @ matrix.dequantize().double().T).float()


def poisoned_check(y, ref, rtol_of_max):
    assert not torch.isnan(y).any()
    assert float((y - ref).abs().max()) <= rtol_of_max * float(ref.abs().max())


@pytest.mark.parametrize("bits,group,sym", list(itertools.product((2, 4, 8), (32, 128, -1),
                                                                  (False, True))))
@pytest.mark.parametrize("shape", [(24, 72), (37, 200)])
def test_ort_matches_dequantized(bits, group, sym, shape):
    matrix = packed_matrix(shape, LayerConfig(bits=bits, group_size=group, sym=sym))
    x = torch.randn(3, shape[1])
    poisoned_check(OrtMatMulNBitsKernel(matrix)(x), reference(x, matrix), ORT_INT8_RTOL)
    exact = OrtMatMulNBitsKernel(matrix, accuracy_level=0)(x)
    torch.testing.assert_close(exact, reference(x, matrix), rtol=1e-4, atol=1e-4)


def test_ort_corrects_clamped_zero_points():
    matrix = packed_matrix((16, 64), LayerConfig(bits=4, group_size=32))
    kernel = OrtMatMulNBitsKernel(matrix, accuracy_level=0)
    assert kernel._correction is not None  # the one-sign rows need it
    x = torch.randn(2, 64)
    torch.testing.assert_close(kernel(x), reference(x, matrix), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [3, 5, 6])
def test_ort_refuses_other_widths(bits):
    with pytest.raises(AutocompressError, match=f"{bits}-bit"):
        OrtMatMulNBitsKernel(packed_matrix((8, 64), LayerConfig(bits=bits)))


def test_ort_refuses_sparse():
    cfg = LayerConfig(bits=4, group_size=32, pattern="2:4", sparsity=0.5, prune_method="magnitude")
    with pytest.raises(AutocompressError, match="2:4"):
        OrtMatMulNBitsKernel(packed_matrix((8, 64), cfg))


@pytest.mark.parametrize("cfg", [LayerConfig(bits=3, group_size=64),
                                 LayerConfig(bits=5, group_size=-1, sym=True),
                                 LayerConfig(bits=16),
                                 LayerConfig(bits=4, sparsity=0.4, prune_method="magnitude"),
                                 LayerConfig(bits=6, pattern="2:4", sparsity=0.5,
                                             prune_method="magnitude")],
                         ids=lambda c: c.short())
def test_torch_kernel_in_chunks(cfg, monkeypatch):
    from autocompress.runtime import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "CHUNK_ELEMENTS", 8 * 100)  # 8 rows a chunk: many chunks
    matrix = packed_matrix((45, 100), cfg)
    kernel = TorchUnpackKernel(matrix)
    assert kernel.rows == 8
    x = torch.randn(5, 100)
    torch.testing.assert_close(kernel(x), reference(x, matrix), rtol=1e-5, atol=1e-5)


def test_ort_group_serves_each_member_once_per_input():
    from autocompress.runtime.cpu_kernels import OrtMatMulNBitsGroup

    cfgs = [LayerConfig(bits=4, group_size=32), LayerConfig(bits=8, group_size=64, sym=True),
            LayerConfig(bits=2, group_size=-1)]
    matrices = [packed_matrix((n, 96), c, seed=n) for n, c in zip((40, 16, 24), cfgs)]
    group = OrtMatMulNBitsGroup(matrices, accuracy_level=0)
    members = [OrtMatMulNBitsKernel(group=group, index=i) for i in range(3)]
    calls = []
    run = group.run
    group.run = lambda x: calls.append(1) or run(x)
    hidden = torch.randn(2, 5, 96)
    x = hidden.reshape(-1, 96)  # QuantLinear passes a fresh view of the same tensor each time
    outs = [member(hidden.reshape(-1, 96)) for member in members]
    assert len(calls) == 1
    for y, matrix in zip(outs, matrices):
        torch.testing.assert_close(y, reference(x, matrix), rtol=1e-4, atol=1e-4)
    hidden.mul_(2)  # changed in place: nothing pending may be served for it
    members[0](hidden.reshape(-1, 96))
    y = members[1](hidden.reshape(-1, 96))
    assert len(calls) == 2
    torch.testing.assert_close(y, reference(hidden.reshape(-1, 96), matrices[1]),
                               rtol=1e-4, atol=1e-4)
    other = torch.randn(3, 96)  # another input: recomputed
    torch.testing.assert_close(members[2](other), reference(other, matrices[2]),
                               rtol=1e-4, atol=1e-4)
    assert len(calls) == 3


@pytest.mark.parametrize("rows", [1, 3, 20])
def test_float16_kernel_decode_and_prefill(rows):
    from autocompress.runtime.cpu_kernels import Float16Kernel

    matrix = packed_matrix((45, 100), LayerConfig(bits=16))
    kernel = Float16Kernel(matrix)
    x = torch.randn(rows, 100) * 1e4  # float16 would overflow without the row scaling
    expected = reference(x, matrix)
    got = kernel(x)
    assert torch.isfinite(got).all()
    tol = 2e-3 if rows <= Float16Kernel.MAX_F16_ROWS else 1e-5
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol * expected.abs().max().item())
    assert kernel.nbytes() == matrix.nbytes() == 45 * 100 * 2


@pytest.mark.parametrize("bits,sym", list(itertools.product((3, 5, 6), (False, True))))
@pytest.mark.parametrize("group", [32, -1])
def test_widened_codes_compute_the_same_weight(bits, sym, group):
    from autocompress.runtime.cpu_kernels import WIDEN_TO, widen_for_ort

    matrix = packed_matrix((37, 200), LayerConfig(bits=bits, group_size=group, sym=sym))
    wide = widen_for_ort(matrix)
    assert wide.bits == WIDEN_TO[bits] and wide.nbytes() > matrix.nbytes()
    torch.testing.assert_close(wide.dequantize(), matrix.dequantize(), rtol=0, atol=0)
    x = torch.randn(3, 200)
    exact = OrtMatMulNBitsKernel(wide, accuracy_level=0)(x)
    torch.testing.assert_close(exact, reference(x, matrix), rtol=1e-4, atol=1e-4)


def test_auto_backend_widens_but_the_ort_backend_does_not():
    from autocompress.runtime.modules import make_kernel

    matrix = packed_matrix((16, 64), LayerConfig(bits=3, group_size=32))
    assert make_kernel(matrix, "auto").name == "ort-widened"
    with pytest.raises(AutocompressError, match="3-bit"):
        make_kernel(matrix, "ort")
    sparse = packed_matrix((16, 64), LayerConfig(bits=3, pattern="2:4", sparsity=0.5,
                                                  prune_method="magnitude"))
    assert make_kernel(sparse, "auto").name == "ort-densified"
    with pytest.raises(AutocompressError, match="3-bit"):
        make_kernel(sparse, "ort")


SPARSE_CONFIGS = [
    LayerConfig(bits=4, group_size=32, pattern="2:4", sparsity=0.5, prune_method="magnitude"),
    LayerConfig(bits=3, group_size=64, pattern="2:4", sparsity=0.5, prune_method="magnitude",
                sym=True),
    LayerConfig(bits=4, group_size=64, sparsity=0.3, prune_method="magnitude"),
    LayerConfig(bits=8, group_size=-1, sparsity=0.5, prune_method="magnitude"),
    LayerConfig(bits=5, group_size=32, sparsity=0.7, prune_method="magnitude"),
    LayerConfig(bits=2, group_size=128, pattern="2:4", sparsity=0.5, prune_method="magnitude"),
]


@pytest.mark.parametrize("cfg", SPARSE_CONFIGS, ids=lambda c: c.short())
@pytest.mark.parametrize("shape", [(24, 128), (37, 200)])
def test_densified_sparse_runs_the_same_weight_on_ort(cfg, shape):
    from autocompress.runtime.cpu_kernels import WIDEN_TO, densify_for_ort

    if cfg.pattern == "2:4" and shape[1] % 4:
        pytest.skip("2:4 needs in_features divisible by 4")
    matrix = packed_matrix(shape, cfg)
    if not cfg.sym:
        # pruning leaves zeros in every group, so its grid holds 0 and z is a code; a grid
        # without 0 (z outside the codes, e.g. loaded from elsewhere) needs the kept-only fix
        matrix.zero[0] = -3.0
        matrix.zero[-1] = float(2 ** cfg.bits + 2)
    ready = densify_for_ort(matrix)
    dense = ready.matrix
    assert dense.layout == "dense" and dense.bits == WIDEN_TO[cfg.bits]
    codes, keep = matrix.codes_and_mask()
    assert torch.equal(keep, ready.keep) and int(keep.sum()) == matrix.n_kept
    # the kept weights are the same codes on the same grid; pruned ones sit at their zero
    torch.testing.assert_close(dense.dequantize()[keep], matrix.dequantize()[keep], rtol=0, atol=0)
    in_range = (matrix.zero_points().round() >= 0) & \
        (matrix.zero_points().round() <= 2**dense.bits - 1)
    column_group = torch.arange(shape[1]) // matrix.group_width
    pruned_in_range = ~keep & in_range[:, column_group]
    assert bool(pruned_in_range.any())
    assert bool((dense.dequantize()[pruned_in_range] == 0).all())
    # the one-sign rows' groups are corrected over their kept weights only: exact at level 0
    x = torch.randn(3, shape[1])
    exact = OrtMatMulNBitsKernel(ready, accuracy_level=0)(x)
    torch.testing.assert_close(exact, reference(x, matrix), rtol=1e-4, atol=1e-4)
    poisoned_check(OrtMatMulNBitsKernel(ready)(x), reference(x, matrix), ORT_INT8_RTOL)
