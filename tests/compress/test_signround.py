import pytest
import torch

from autocompress.compress.apply import compress_model
from autocompress.compress.calibration import BlockRunner
from autocompress.compress.quant import quantize_rtn
from autocompress.compress.signround import LearnedGrid, SignRound, SignRoundSettings
from autocompress.compress.weights import compress_weight
from autocompress.errors import AutocompressError
from autocompress.plan import LayerConfig, uniform_plan


def _windows(loaded, n=4, length=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, loaded.model.config.vocab_size, (n, length), generator=g)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("shape, group", [((16, 128), 64), ((8, 96), 64), ((8, 40), -1)])
def test_untuned_grid_is_the_rtn_grid(shape, group, sym):
    """Before any step the learned grid stores exactly what RTN stores (a ragged last group
    included), and its differentiable weight is RTN's decoded weight."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    grid = LearnedGrid(w, 3, group, sym)
    got, want = grid.quantized(), quantize_rtn(w, 3, group, sym)
    assert torch.equal(got.q, want.q)
    assert torch.allclose(got.scale, want.scale) and torch.equal(got.zero, want.zero)
    assert torch.allclose(grid().detach(), want.dequantize(), atol=1e-6)


def test_an_awq_grid_before_tuning_is_rtn_of_the_scaled_weight():
    """With AWQ's input scale s the untuned grid stores RTN of W·diag(s) and s itself, and the
    layer's weight is that grid decoded and divided by s, as the stored layer computes it."""
    g = torch.Generator().manual_seed(3)
    w, s = torch.randn(8, 128, generator=g), torch.rand(128, generator=g) + 0.5
    grid = LearnedGrid(w, 3, 64, False, input_scale=s)
    got, want = grid.quantized(), quantize_rtn(w * s, 3, 64, False)
    assert torch.equal(got.q, want.q) and torch.equal(got.input_scale, s)
    assert torch.allclose(grid().detach(), want.dequantize() / s, atol=1e-6)
    assert torch.allclose(got.dequantize(), want.dequantize() / s, atol=1e-6)


def test_signed_steps_stay_inside_the_bounds():
    grid = LearnedGrid(torch.randn(4, 64), 2, 32, False)
    for _ in range(40):
        (grid().square().sum() * -1).backward()  # pushes every factor and offset one way
        grid.step(0.1)
    assert grid.offset.abs().max() <= 0.5
    assert grid.shrink_min.min() >= 0.5 and grid.shrink_max.max() <= 1.0
    q = grid.quantized()
    assert int(q.q.max()) <= 3 and q.scale.gt(0).all()


def _block_setup(tiny_loaded, bits=2):
    model = tiny_loaded.model
    runner = BlockRunner(model, _windows(tiny_loaded))
    block = runner.blocks[0]
    targets = runner.outputs(0)
    names = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    grids = {n: LearnedGrid(block.get_submodule(n).weight, bits, 32, False) for n in names}
    return runner, block, targets, grids


def test_tuning_lowers_the_block_output_error_and_leaves_the_block_alone(tiny_loaded):
    runner, block, targets, grids = _block_setup(tiny_loaded)
    before = {n: (p.clone(), p.requires_grad) for n, p in block.named_parameters()}
    tuner = SignRound(block, grids, SignRoundSettings(steps=100, lr=1 / 100, eval_every=10))
    rtn_loss = tuner.loss(runner.hidden, runner.kwargs, targets)
    kept = tuner.tune(runner.hidden, runner.kwargs, targets)
    assert tuner.losses[0] == (0, pytest.approx(rtn_loss))
    assert kept < 0.8 * rtn_loss, tuner.losses
    assert kept == pytest.approx(tuner.loss(runner.hidden, runner.kwargs, targets))
    for n, p in block.named_parameters():
        assert torch.equal(p, before[n][0]) and p.grad is None
        assert p.requires_grad == before[n][1]


def _held_out_error(loaded, cfg: LayerConfig) -> tuple[float, dict]:
    """A uniform ``cfg`` plan built on 8 calibration windows: the mean squared error of its
    logits on 4 other windows, and its compressed layers by name."""
    calib, held_out = _windows(loaded, 8, 32, seed=1), _windows(loaded, 4, 32, seed=9)
    layers = {}
    model = compress_model(loaded, uniform_plan(loaded.identity, cfg), calib, progress=False,
                           on_layer=lambda layer, cfg, c: layers.update({layer.name: c}))
    with torch.no_grad():
        error = (model(held_out).logits - loaded.model(held_out).logits).square().mean()
    return error.item(), layers


def test_signround_plan_beats_rtn_at_the_same_format(tiny_loaded):
    """End to end, on windows the tuning never saw: the logits of a uniform 2-bit signround
    plan are closer to the uncompressed model's than RTN's, in RTN's exact storage format."""
    rtn, _ = _held_out_error(tiny_loaded, LayerConfig(bits=2, group_size=32))
    learned, layers = _held_out_error(tiny_loaded,
                                      LayerConfig(bits=2, group_size=32, method="signround"))
    assert learned < 0.9 * rtn, (learned, rtn)
    for name, compressed in layers.items():
        (qw,) = compressed.quantized
        assert (qw.bits, qw.group_size, qw.sym) == (2, 32, False) and int(qw.q.max()) <= 3
        assert torch.allclose(compressed.factors[0], qw.dequantize())


def test_signround_with_awq_keeps_the_input_scales_and_beats_awq_rtn(tiny_loaded):
    """A signround + AWQ plan: every layer keeps an input scale (the bytes of an AWQ layer),
    the first block's scales are those AWQ chooses for RTN on the same statistics, and on
    windows the tuning never saw its logits are closer to the uncompressed model's than
    RTN + AWQ's."""
    from autocompress.accounting import layer_bytes

    rtn, rtn_layers = _held_out_error(tiny_loaded, LayerConfig(bits=2, group_size=32, awq=True))
    learned, layers = _held_out_error(
        tiny_loaded, LayerConfig(bits=2, group_size=32, method="signround", awq=True))
    assert learned < 0.9 * rtn, (learned, rtn)
    first_block = [l.name for l in tiny_loaded.layers if l.block == 0]
    assert first_block
    for layer in tiny_loaded.layers:
        (qw,) = layers[layer.name].quantized
        assert qw.input_scale is not None and qw.input_scale.shape == (layer.in_features,)
        assert torch.allclose(layers[layer.name].factors[0], qw.dequantize())
        if layer.name in first_block:
            assert torch.equal(qw.input_scale, rtn_layers[layer.name].quantized[0].input_scale)
    awq = LayerConfig(bits=2, group_size=32, method="signround", awq=True)
    plain = LayerConfig(bits=2, group_size=32, method="signround")
    assert layer_bytes(16, 64, awq) == layer_bytes(16, 64, plain) + 2 * 64


def test_signround_needs_sequential_calibration(tiny_loaded):
    plan = uniform_plan(tiny_loaded.identity, LayerConfig(bits=3, method="signround"))
    with pytest.raises(AutocompressError, match="calibration"):
        compress_model(tiny_loaded, plan, progress=False)
    with pytest.raises(AutocompressError, match="sequential"):
        compress_model(tiny_loaded, plan, _windows(tiny_loaded), mode="parallel", progress=False)
    with pytest.raises(AutocompressError, match="per block"):
        compress_weight(torch.randn(8, 64), LayerConfig(bits=3, method="signround"))


def test_signround_config_rules():
    assert LayerConfig(bits=3, method="signround", clip=True) == LayerConfig(bits=3,
                                                                             method="signround")
    with pytest.raises(AutocompressError, match="dense"):
        LayerConfig(bits=3, method="signround", sparsity=0.5)
    with pytest.raises(AutocompressError, match="gguf"):
        LayerConfig(gguf="q4_k", method="signround")


def test_search_spaces_refuse_signround_with_a_reason():
    from autocompress.search.space import SearchSpace

    with pytest.raises(AutocompressError, match="signround yet"):
        SearchSpace([LayerConfig(bits=4), LayerConfig(bits=3, method="signround")])


@pytest.mark.parametrize("awq", [False, True])
def test_a_signround_plan_applies_packed_as_it_was_built(tiny_model_dir, tmp_path, awq):
    """plan -> apply --packed: the packed runtime computes what the plan's own build computes
    (the learned codes survive packing, and AWQ's input scales with them), and RTN's packing
    of the same format differs."""
    from autocompress.cli import main
    import dataclasses

    from autocompress.compress.reproduce import build_model
    from autocompress.model import load_model
    from autocompress.plan import Plan
    from autocompress.runtime.convert import load_packed

    plan_path = tmp_path / "signround.json"
    assert main(["plan", "--model", str(tiny_model_dir), "--bits", "3", "--method", "signround",
                 "--calib-windows", "2", "--window-len", "64", "--out", str(plan_path)]
                + (["--awq"] if awq else [])) == 0
    assert main(["apply", str(plan_path), "--packed", "--out", str(tmp_path / "packed")]) == 0
    loaded = load_model(str(tiny_model_dir))
    plan = Plan.load(plan_path)
    assert plan.default.awq == awq
    reference = build_model(loaded, plan, progress=False)
    rtn = build_model(loaded, dataclasses.replace(plan, default=LayerConfig(bits=3, awq=awq)),
                      progress=False)
    packed = load_packed(tmp_path / "packed")
    x = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        got, want, other = packed.model(x).logits, reference(x).logits, rtn(x).logits
    assert torch.allclose(got, want, atol=2e-2, rtol=1e-2)
    assert not torch.allclose(got, other, atol=2e-2, rtol=1e-2)
