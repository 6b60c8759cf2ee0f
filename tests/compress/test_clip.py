"""Clipped grids (compress/quant.py's clipped_group_params): against a plain loop over groups
and shrink factors, never worse than the min/max grid on their own objective, better on
weights with outliers, and GPTQ with clipped grids on a tiny model's real statistics."""

import pytest
import torch

from autocompress.compress.gptq import GPTQ
from autocompress.compress.quant import (
    CLIP_SHRINKS,
    clipped_group_params,
    group_params,
    quantize_rtn,
)


def reference_clip(w, bits, group_size, sym, importance):
    """Each group, each shrink factor, written out: the least weighted squared error wins
    (the first, i.e. widest, on a tie)."""
    out_features, in_features = w.shape
    width = in_features if group_size == -1 else group_size
    qmax = 2**bits - 1
    scales, zeros = torch.zeros(out_features, -(-in_features // width)), None
    zeros = torch.zeros_like(scales)
    for r in range(out_features):
        for g, start in enumerate(range(0, in_features, width)):
            group, imp = w[r, start:start + width], importance[start:start + width]
            best = None
            for alpha in CLIP_SHRINKS:
                lo, hi = alpha * group.min(), alpha * group.max()
                if sym:
                    scale = 2 * torch.maximum(lo.abs(), hi.abs()) / qmax
                    zero = torch.tensor(float(2 ** (bits - 1)))
                else:
                    scale = (hi - lo) / qmax
                    zero = torch.round(-lo / scale)
                q = torch.clamp(torch.round(group / scale) + zero, 0, qmax)
                error = float((imp * ((q - zero) * scale - group) ** 2).sum())
                if best is None or error < best[0]:
                    best = (error, scale, zero)
            scales[r, g], zeros[r, g] = best[1], best[2]
    return scales, zeros


def _weighted_error(w, bits, group_size, sym, clip, importance):
    q = quantize_rtn(w, bits, group_size, sym, clip=clip, importance=importance)
    return float((importance * (q.dequantize() - w) ** 2).sum())


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [32, 48, -1])  # 48: a ragged last group of 100 columns
def test_matches_the_loop_reference(sym, group_size):
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((6, 100))
    importance = torch.rand(100) + 0.1
    scale, zero = clipped_group_params(w, 3, group_size, sym, importance)
    ref_scale, ref_zero = reference_clip(w, 3, group_size, sym, importance)
    torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(zero, ref_zero, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sym", [False, True])
def test_never_worse_and_clearly_better_with_outliers(bits, sym):
    torch.manual_seed(1)
    w = torch.distributions.StudentT(2.5).sample((64, 256))  # heavy tails, as LLM weights
    importance = torch.rand(256) ** 2 + 0.01
    plain = _weighted_error(w, bits, 64, sym, False, importance)
    clipped = _weighted_error(w, bits, 64, sym, True, importance)
    assert clipped <= plain
    assert clipped < 0.95 * plain  # outliers cost less clipped than the resolution they take


def test_per_group_never_worse_and_the_importance_decides():
    torch.manual_seed(2)
    w = torch.distributions.StudentT(2.5).sample((32, 128))
    # all the importance on the columns that hold each row's largest weight: clipping them
    # costs most, so the weighted grid clips less than the unweighted one
    outlier_columns = w.abs().argmax(dim=1).unique()
    importance = torch.full((128,), 1e-3)
    importance[outlier_columns] = 1.0
    s_weighted, _ = clipped_group_params(w, 3, 128, False, importance)
    s_plain, _ = clipped_group_params(w, 3, 128, False, None)
    s_minmax, _ = group_params(w, 3, 128, False)
    assert (s_weighted >= s_plain - 1e-7).all() and (s_weighted > s_plain + 1e-7).any()
    assert (s_plain <= s_minmax + 1e-7).all() and (s_plain < s_minmax - 1e-7).any()


def test_format_is_the_min_max_grids():
    torch.manual_seed(3)
    w = torch.randn(16, 64)
    plain, clipped = quantize_rtn(w, 3, 32, False), quantize_rtn(w, 3, 32, False, clip=True)
    assert clipped.q.dtype == plain.q.dtype and clipped.q.shape == plain.q.shape
    assert clipped.scale.shape == plain.scale.shape and int(clipped.q.max()) <= 7
    assert torch.equal(clipped.zero, clipped.zero.round())  # integer zero points, as stored


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_clipped_grids_lowers_its_output_error_on_a_tiny_model(tiny_loaded,
                                                                           act_order):
    """GPTQ's own objective, tr(ΔW H ΔWᵀ) with the layer's real input Hessian, summed over
    the tiny model's layers at 3 bits: clipped grids lower it."""
    from autocompress.compress.calibration import collect_stats

    torch.manual_seed(4)
    windows = torch.randint(0, tiny_loaded.model.config.vocab_size, (4, 64))
    stats = collect_stats(tiny_loaded.model, tiny_loaded.layers, windows, progress=False)
    totals = {False: 0.0, True: 0.0}
    for layer in tiny_loaded.layers:
        w = tiny_loaded.module(layer.name).weight.detach().float()
        H = stats[layer.name].hessian.float()
        for clip in (False, True):
            gptq = GPTQ.from_hessian(w, 2 * H, stats[layer.name].n_samples)
            q = gptq.quantize(3, 32, False, act_order=act_order, clip=clip)
            delta = q.dequantize() - w
            totals[clip] += float(((delta @ H) * delta).sum())
    assert totals[True] < 0.97 * totals[False]


def test_a_clipped_plan_weighs_errors_by_its_calibration(tiny_loaded):
    """A plan's `clip: true` layer is built with the calibration's mean x² as the importance
    (parallel mode: the uncompressed model's statistics), not with every column alike."""
    from autocompress.compress.apply import compress_model
    from autocompress.compress.calibration import collect_stats
    from autocompress.plan import LayerConfig

    torch.manual_seed(5)
    windows = torch.randint(0, tiny_loaded.model.config.vocab_size, (2, 64))
    configs = {layer.name: LayerConfig(bits=3, group_size=32, clip=True)
               for layer in tiny_loaded.layers}
    built = compress_model(tiny_loaded, configs, windows, mode="parallel", progress=False)
    stats = collect_stats(tiny_loaded.model, tiny_loaded.layers, windows, progress=False)
    differs = 0
    for layer in tiny_loaded.layers:
        w = tiny_loaded.module(layer.name).weight.detach().float()
        importance = stats[layer.name].mean_square
        if importance is None:
            importance = stats[layer.name].hessian.diagonal()
        weighted = quantize_rtn(w, 3, 32, False, clip=True, importance=importance).dequantize()
        got = built.get_submodule(layer.name).weight.detach().float()
        torch.testing.assert_close(got, weighted.to(got.dtype).float(), rtol=0, atol=0)
        unweighted = quantize_rtn(w, 3, 32, False, clip=True).dequantize()
        differs += not torch.equal(weighted, unweighted)
    assert differs > len(tiny_loaded.layers) // 2
