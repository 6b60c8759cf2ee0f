import pytest
import torch

from autocompress.accounting import layer_bytes
from autocompress.compress.awq import ALPHA_GRID, scales_for, search_input_scale
from autocompress.compress.codes_linear import decode
from autocompress.compress.memo import _from_bytes, _to_bytes
from autocompress.compress.quant import fake_quantize, quantize_rtn
from autocompress.compress.weights import CompressedLayer, LayerStats, compress_weight
from autocompress.errors import AutocompressError
from autocompress.plan import LayerConfig
from autocompress.sensitivity.build import is_plain_rtn


def _layer(out=32, inp=128, outliers=4, seed=0):
    """A weight and calibration inputs whose few columns carry 20x larger activations (the
    situation AWQ is for)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    x = torch.randn(2048, inp, generator=g)
    x[:, :outliers] *= 20
    stats = LayerStats(H=x.T @ x / x.shape[0], act_norm=None, n_samples=x.shape[0],
                       mean_square=(x * x).mean(0))
    return w, x, stats


def _output_error(w_hat, w, x):
    return float(((x @ (w_hat - w).T) ** 2).sum(1).mean())


@pytest.mark.parametrize("clip", [False, True])
def test_the_searched_scale_is_the_plain_grid_search_on_real_inputs(clip):
    """Reference: for each α, quantize W·s (on the grid the layer will have), run the real
    inputs divided by s, compare outputs."""
    w, x, stats = _layer()
    rms = x.pow(2).mean(0).sqrt()
    errors = []
    for k in range(ALPHA_GRID):
        s = scales_for(rms, k / ALPHA_GRID)
        grid = quantize_rtn(w * s, 3, 64, False, clip=True, importance=(x / s).pow(2).mean(0)) \
            if clip else quantize_rtn(w * s, 3, 64, False)
        y_hat = (x / s) @ grid.dequantize().T
        errors.append(float(((y_hat - x @ w.T) ** 2).sum(1).mean()))
    s, alpha = search_input_scale(w, stats, 3, 64, False, clip=clip)
    assert alpha == min(range(ALPHA_GRID), key=errors.__getitem__) / ALPHA_GRID
    assert torch.equal(s, scales_for(rms, alpha))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_awq_lowers_the_output_error_where_a_few_inputs_are_large(method):
    w, x, stats = _layer()
    plain = compress_weight(w, LayerConfig(bits=3, method=method), stats).weight()
    scaled = compress_weight(w, LayerConfig(bits=3, method=method, awq=True), stats)
    assert _output_error(scaled.weight(), w, x) < 0.8 * _output_error(plain, w, x)
    (qw,) = scaled.quantized
    assert qw.input_scale is not None and qw.input_scale.shape == (128,)
    assert torch.equal(qw.input_scale, qw.input_scale.half().float())  # stored as float16


def test_alpha_zero_is_the_layer_unscaled():
    w, _, stats = _layer()
    assert torch.equal(scales_for(stats.mean_square.sqrt(), 0.0), torch.ones(128))
    rtn = quantize_rtn(w, 3, 64, False)
    assert torch.equal(fake_quantize(w * 1.0, 3, 64, False), rtn.dequantize())


def test_codes_decode_and_memo_keep_the_input_scale():
    w, _, stats = _layer()
    compressed = compress_weight(w, LayerConfig(bits=4, awq=True), stats)
    (qw,) = compressed.quantized
    assert torch.equal(decode(qw), qw.dequantize())
    assert torch.equal(compressed.factors[0], qw.dequantize())
    kept = _from_bytes(_to_bytes(CompressedLayer([None], [None], [qw])))
    assert torch.equal(kept.quantized[0].input_scale, qw.input_scale)


def test_awq_bytes_count_the_scale_and_the_config_rules():
    plain, awq = LayerConfig(bits=4), LayerConfig(bits=4, awq=True)
    assert layer_bytes(32, 128, awq) == layer_bytes(32, 128, plain) + 2 * 128
    assert "awq" in awq.short() and "awq" not in plain.to_dict() and awq.to_dict()["awq"]
    assert LayerConfig(bits=16, awq=True) == LayerConfig(bits=16)
    assert not is_plain_rtn(awq)
    assert LayerConfig(bits=3, method="signround", awq=True).awq  # its grid learned on W·s
    for bad in (dict(gguf="q4_0", awq=True), dict(bits=3, awq=True, sparsity=0.5),
                dict(bits=3, awq=True, rank_ratio=0.5), dict(bits=3, awq="yes")):
        with pytest.raises(AutocompressError):
            LayerConfig(**bad)
    with pytest.raises(AutocompressError, match="calibration"):
        compress_weight(torch.randn(8, 64), awq)


def test_an_awq_plan_applies_packed_with_its_scales(tiny_model_dir, tmp_path):
    """plan --awq -> apply --packed: the packed runtime computes the plan's build, and its
    bytes are the accounting's (the input scales included)."""
    from autocompress.cli import main
    from autocompress.compress.reproduce import build_model
    from autocompress.model import load_model
    from autocompress.plan import Plan
    from autocompress.runtime.convert import load_packed, load_packed_layers, quant_linears

    plan_path = tmp_path / "awq.json"
    assert main(["plan", "--model", str(tiny_model_dir), "--bits", "3", "--awq",
                 "--calib-windows", "2", "--window-len", "64", "--out", str(plan_path)]) == 0
    assert main(["apply", str(plan_path), "--packed", "--out", str(tmp_path / "packed")]) == 0
    loaded = load_model(str(tiny_model_dir))
    plan = Plan.load(plan_path)
    reference = build_model(loaded, plan, progress=False)
    packed = load_packed(tmp_path / "packed")
    x = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert torch.allclose(packed.model(x).logits, reference(x).logits, atol=2e-2, rtol=1e-2)
    layers = quant_linears(packed.model)
    assert all(m.input_scale is not None for m in layers.values())
    stored, _ = load_packed_layers(tmp_path / "packed")
    assert sum(m.nbytes() for m in stored.values()) == sum(
        layer_bytes(l.out_features, l.in_features, plan.config_for(l.name))
        for l in loaded.layers)
