import math

import pytest
import torch

from autocompress.compress.quant import (
    QuantizedWeight,
    fake_quantize,
    group_params,
    n_groups,
    quant_error_many,
    quantize_rtn,
)


def reference_rtn(w, bits, group_size, sym):
    """The grid written out with explicit loops over rows and groups."""
    out_features, in_features = w.shape
    width = in_features if group_size == -1 else group_size
    qmax = 2**bits - 1
    codes = torch.zeros(out_features, in_features)
    scales, zeros = [], []
    for r in range(out_features):
        row_scales, row_zeros = [], []
        for start in range(0, in_features, width):
            group = w[r, start:start + width]
            if sym:
                scale = 2 * group.abs().max() / qmax
                zero = torch.tensor(float(2 ** (bits - 1)))
            else:
                scale = (group.max() - group.min()) / qmax
                zero = torch.round(-group.min() / scale)
            codes[r, start:start + width] = torch.clamp(torch.round(group / scale) + zero, 0, qmax)
            row_scales.append(scale)
            row_zeros.append(zero)
        scales.append(torch.stack(row_scales))
        zeros.append(torch.stack(row_zeros))
    scales, zeros = torch.stack(scales), torch.stack(zeros)
    deq = torch.zeros_like(w)
    for r in range(out_features):
        for c in range(in_features):
            g = c // width
            deq[r, c] = (codes[r, c] - zeros[r, g]) * scales[r, g]
    return codes, scales, zeros, deq


def random_weight(out_features, in_features, seed=0):
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "shape,group_size", [((7, 50), 16), ((8, 64), 32), ((8, 64), -1), ((5, 40), 128)]
)
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_matches_loop_reference(shape, group_size, bits, sym):
    w = random_weight(*shape, seed=bits)
    codes, scales, zeros, deq = reference_rtn(w, bits, group_size, sym)
    qw = quantize_rtn(w, bits, group_size, sym)
    assert qw.q.dtype == torch.uint8
    assert torch.equal(qw.q.float(), codes)
    assert torch.allclose(qw.scale, scales, rtol=1e-6, atol=0)
    assert torch.equal(qw.zero, zeros)
    assert torch.allclose(qw.dequantize(), deq, rtol=1e-6, atol=1e-7)
    assert torch.equal(fake_quantize(w, bits, group_size, sym), qw.dequantize())


def test_hand_computed_asymmetric_example():
    # 2 bits over [-1, 2]: scale 1, zero round(1) = 1; 0.5 rounds half to even -> 0
    qw = quantize_rtn(torch.tensor([[-1.0, 0.5, 2.0]]), bits=2, group_size=-1, sym=False)
    assert qw.scale.tolist() == [[1.0]] and qw.zero.tolist() == [[1.0]]
    assert qw.q.tolist() == [[0, 1, 3]]
    assert qw.dequantize().tolist() == [[-1.0, 0.0, 2.0]]


def test_hand_computed_symmetric_example():
    # 3 bits, max|w| = 3.5: scale 2*3.5/7 = 1, zero 4; +3.5 clips to code 7 -> 3.0
    qw = quantize_rtn(torch.tensor([[-3.5, 1.2, 3.5]]), bits=3, group_size=-1, sym=True)
    assert qw.scale.tolist() == [[1.0]] and qw.zero.tolist() == [[4.0]]
    assert qw.q.tolist() == [[0, 5, 7]]
    assert qw.dequantize().tolist() == [[-4.0, 1.0, 3.0]]


def test_ragged_last_group_is_shorter_not_dropped():
    assert n_groups(576, 128) == 5
    assert n_groups(576, -1) == 1
    w = random_weight(3, 576)
    qw = quantize_rtn(w, 4, 128, False)
    assert qw.scale.shape == (3, 5) and qw.q.shape == (3, 576)
    last = w[:, 512:]
    assert torch.allclose(qw.scale[:, 4], (last.amax(1) - last.amin(1)) / 15)
    # every column is quantized: the error of the last 64 columns is bounded by half a step
    err = (qw.dequantize() - w)[:, 512:].abs()
    assert (err <= qw.scale[:, 4:5] / 2 + 1e-6).all()


@pytest.mark.parametrize("value", [0.3, -2.7, 0.0, 1e-3])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_constant_group_is_exact_asymmetric(value, bits):
    w = random_weight(2, 64)
    w[:, 32:] = value
    deq = fake_quantize(w, bits, 32, sym=False)
    assert torch.equal(deq[:, 32:], w[:, 32:])
    assert torch.isfinite(deq).all()


def test_all_zero_group_is_exact_symmetric():
    w = random_weight(2, 64)
    w[:, :32] = 0
    deq = fake_quantize(w, 4, 32, sym=True)
    assert torch.equal(deq[:, :32], torch.zeros(2, 32))


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [32, -1])
def test_zero_stays_exact_in_groups_that_contain_it(sym, group_size):
    w = random_weight(6, 64)
    w[:, ::3] = 0
    assert (fake_quantize(w, 3, group_size, sym)[:, ::3] == 0).all()


def test_codes_within_range():
    w = random_weight(8, 64) * 10
    for bits in (2, 3, 4, 5, 6, 8):
        for sym in (False, True):
            q = quantize_rtn(w, bits, 32, sym).q
            assert int(q.min()) >= 0 and int(q.max()) <= 2**bits - 1


@pytest.mark.parametrize("group_size", [32, 64, -1])
@pytest.mark.parametrize("sym", [False, True])
def test_error_decreases_with_bits(group_size, sym):
    w = random_weight(16, 128)
    errors = [float((fake_quantize(w, b, group_size, sym) - w).pow(2).sum())
              for b in (2, 3, 4, 5, 6, 8)]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-3 * errors[0]


def test_smaller_groups_give_smaller_error():
    w = random_weight(16, 128)
    errors = [float((fake_quantize(w, 3, g, False) - w).pow(2).sum()) for g in (-1, 128, 64, 32)]
    assert errors == sorted(errors, reverse=True)


def test_group_params_shapes_and_values():
    w = random_weight(4, 50)
    scale, zero = group_params(w, 4, 16, sym=False)
    assert scale.shape == zero.shape == (4, math.ceil(50 / 16))
    assert scale.dtype == torch.float32
    qw = quantize_rtn(w, 4, 16, sym=False)
    assert torch.equal(scale, qw.scale) and torch.equal(zero, qw.zero)


OPTIONS = [(2, 32, False), (3, 32, True), (4, -1, False), (8, 64, True), (4, 32, False)]


def test_quant_error_many_matches_fake_quantize():
    w = random_weight(8, 96)
    expected = torch.stack([(fake_quantize(w, *opt) - w).pow(2).sum() for opt in OPTIONS])
    assert torch.allclose(quant_error_many(w, OPTIONS), expected, rtol=1e-5)


def test_quant_error_many_weighted_by_hessian():
    w = random_weight(8, 96)
    x = torch.randn(256, 96, generator=torch.Generator().manual_seed(1))
    H = x.T @ x / 256
    expected = []
    for opt in OPTIONS:
        output_error = ((fake_quantize(w, *opt) - w) @ x.T).pow(2).sum() / 256  # E‖ΔW x‖²
        expected.append(output_error)
    assert torch.allclose(quant_error_many(w, OPTIONS, H), torch.stack(expected), rtol=1e-4)


def test_inputs_untouched_and_half_precision_accepted():
    w = random_weight(4, 64).half()
    before = w.clone()
    qw = quantize_rtn(w, 4, 32, False)
    assert torch.equal(w, before)
    assert qw.dequantize().dtype == torch.float32
    assert isinstance(qw, QuantizedWeight)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        quantize_rtn(torch.zeros(4), 4, 32, False)
    with pytest.raises(ValueError):
        quantize_rtn(torch.zeros(4, 4), 16, 32, False)


@pytest.mark.parametrize("chunk", [1, 100, 1 << 18])  # one row (or less) per chunk .. all rows
@pytest.mark.parametrize("sym", [False, True])
def test_row_chunks_change_no_bit(monkeypatch, chunk, sym):
    """The grids are computed a chunk of rows at a time (speed): every chunking gives the
    bits of quantize_rtn's codes decoded, clipped or not, ragged last group included."""
    from autocompress.compress import quant

    w = random_weight(37, 200, seed=3)
    importance = torch.rand(200, generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(quant, "CHUNK_ELEMENTS", chunk)
    for bits, group_size in [(2, 64), (3, 64), (4, -1), (8, 32)]:
        for clip in (False, True):
            qw = quantize_rtn(w, bits, group_size, sym, clip=clip, importance=importance)
            assert torch.equal(fake_quantize(w, bits, group_size, sym, clip=clip,
                                             importance=importance), qw.dequantize())
            if clip:
                monkeypatch.setattr(quant, "CHUNK_ELEMENTS", 1 << 30)
                whole = group_params(w, bits, group_size, sym, True, importance)
                monkeypatch.setattr(quant, "CHUNK_ELEMENTS", chunk)
                assert torch.equal(qw.scale, whole[0]) and torch.equal(qw.zero, whole[1])
