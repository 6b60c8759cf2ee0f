import pytest
import torch

from autocompress.compress.lowrank import low_rank_factors
from autocompress.compress.prune import magnitude_mask, wanda_mask
from autocompress.compress.quant import expand_groups, fake_quantize, quantize_with_params
from autocompress.compress.weights import LayerStats, compress_weight
from autocompress.errors import AutocompressError
from autocompress.plan import LayerConfig

OUT, IN, N = 32, 128, 1024


@pytest.fixture(scope="module")
def layer():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(OUT, IN, generator=g)
    x = torch.randn(N, IN, generator=g) @ torch.randn(IN, IN, generator=g)
    stats = LayerStats(H=x.T @ x / N, act_norm=x.norm(dim=0), n_samples=N)
    return w, x, stats


def output_error(w, w_hat, x):
    return float(((w - w_hat) @ x.T).pow(2).sum())


def assert_on_grid(factor, quantized):
    """Every weight is its group's (code − zero) · scale, with codes in [0, 2^b − 1]."""
    scale = expand_groups(quantized.scale, quantized.group_size, factor.shape[1])
    zero = expand_groups(quantized.zero, quantized.group_size, factor.shape[1])
    assert torch.equal(quantized.dequantize(), factor)
    codes = quantize_with_params(factor, scale, zero, quantized.bits)
    assert torch.equal(codes, quantized.q.float())
    assert int(quantized.q.max()) <= 2**quantized.bits - 1


def test_identity_config_rounds_to_float16(layer):
    w, _, _ = layer
    out = compress_weight(w, LayerConfig())
    assert torch.equal(out.weight(), w.half().float())
    assert out.masks == [None] and out.quantized == [None]


def test_rtn_is_fake_quantize(layer):
    w, _, _ = layer
    out = compress_weight(w, LayerConfig(bits=4, group_size=32))
    assert torch.equal(out.weight(), fake_quantize(w, 4, 32, sym=False))
    assert_on_grid(out.factors[0], out.quantized[0])


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("sym", [False, True])
def test_pruned_weights_stay_exactly_zero_after_quantization(layer, method, sym):
    w, _, stats = layer
    cfg = LayerConfig(bits=3, group_size=32, sym=sym, method=method, sparsity=0.6)
    out = compress_weight(w, cfg, stats)
    mask = out.masks[0]
    assert (out.weight()[~mask] == 0).all()
    assert (mask.sum(1) == IN - round(0.6 * IN)).all()
    assert_on_grid(out.factors[0], out.quantized[0])


def test_gptq_prunes_and_quantizes_jointly_better_than_rtn(layer):
    w, x, stats = layer
    errors = {
        method: output_error(w, compress_weight(w, LayerConfig(bits=4, group_size=32, method=method,
                                                               pattern="2:4"), stats).weight(), x)
        for method in ("rtn", "gptq")
    }
    assert errors["gptq"] < 0.95 * errors["rtn"]  # measured 0.88


def test_low_rank_then_two_four_then_four_bits(layer):
    w, _, stats = layer
    cfg = LayerConfig(bits=4, group_size=32, pattern="2:4", rank_ratio=0.5)  # rank 12
    out = compress_weight(w, cfg, stats)
    A, B = out.factors
    assert A.shape == (OUT, 12) and B.shape == (12, IN)
    for factor, mask, quantized in zip(out.factors, out.masks, out.quantized):
        quads = (factor != 0).reshape(factor.shape[0], -1, 4)
        assert (quads.sum(2) <= 2).all()  # 2:4 (a kept weight may also round to 0)
        assert (mask.reshape(factor.shape[0], -1, 4).sum(2) == 2).all()
        assert (factor[~mask] == 0).all()
        assert_on_grid(factor, quantized)
    assert torch.equal(out.weight(), A @ B)


def test_low_rank_factor_a_is_pruned_with_the_statistics_of_b_x(layer):
    w, x, stats = layer
    cfg = LayerConfig(bits=16, sparsity=0.5, prune_method="wanda", rank_ratio=0.5)
    out = compress_weight(w, cfg, stats)
    A, _ = low_rank_factors(w, 0.5, H=stats.H)  # B is whitened by the layer's inputs
    inputs_of_a = x @ out.factors[1].T
    assert torch.equal(out.masks[0], wanda_mask(A, inputs_of_a.norm(dim=0), 0.5))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("rank_ratio", [1.0, 0.5])
@pytest.mark.parametrize("prune_method", ["magnitude", "wanda"])
def test_per_channel_groups_everywhere(layer, method, rank_ratio, prune_method):
    w, _, stats = layer
    cfg = LayerConfig(bits=4, group_size=-1, method=method, sparsity=0.3,
                      prune_method=prune_method, rank_ratio=rank_ratio)
    out = compress_weight(w, cfg, stats)
    assert out.weight().shape == w.shape and torch.isfinite(out.weight()).all()
    for factor, quantized in zip(out.factors, out.quantized):
        assert quantized.scale.shape == (factor.shape[0], 1)
        assert_on_grid(factor, quantized)


def test_float16_low_rank_factors(layer):
    w, _, _ = layer
    out = compress_weight(w, LayerConfig(rank_ratio=0.5))
    A, B = low_rank_factors(w, 0.5)
    assert torch.equal(out.factors[0], A.half().float())
    assert torch.equal(out.factors[1], B.half().float())
    assert out.quantized == [None, None]


def test_wanda_from_hessian_alone_matches_explicit_norms(layer):
    w, _, stats = layer
    cfg = LayerConfig(sparsity=0.5, prune_method="wanda")
    from_h = compress_weight(w, cfg, LayerStats(H=stats.H, act_norm=None, n_samples=N))
    assert torch.equal(from_h.masks[0], compress_weight(w, cfg, stats).masks[0])


def test_magnitude_needs_no_statistics(layer):
    w, _, _ = layer
    out = compress_weight(w, LayerConfig(bits=4, sparsity=0.5, prune_method="magnitude"))
    assert torch.equal(out.masks[0], magnitude_mask(w, 0.5))


@pytest.mark.parametrize("cfg,stats", [
    (LayerConfig(sparsity=0.5, prune_method="wanda"), None),
    (LayerConfig(bits=4, method="gptq"), None),
    (LayerConfig(bits=4, method="gptq"), LayerStats(H=None, act_norm=torch.ones(IN), n_samples=N)),
    (LayerConfig(sparsity=0.5, prune_method="wanda", rank_ratio=0.5),
     LayerStats(H=None, act_norm=torch.ones(IN), n_samples=N)),
])
def test_missing_calibration_data_is_reported(layer, cfg, stats):
    w, _, _ = layer
    with pytest.raises(AutocompressError, match="calibration"):
        compress_weight(w, cfg, stats)


def test_two_four_low_rank_needs_rank_divisible_by_four(layer):
    w, _, stats = layer
    with pytest.raises(AutocompressError, match="rank 7"):
        compress_weight(w, LayerConfig(pattern="2:4", rank_ratio=0.3), stats)


def test_inputs_untouched(layer):
    w, _, stats = layer
    w16 = w.half()
    before, H_before = w16.clone(), stats.H.clone()
    compress_weight(w16, LayerConfig(bits=3, method="gptq", sparsity=0.5, rank_ratio=0.5), stats)
    assert torch.equal(w16, before) and torch.equal(stats.H, H_before)
