import pytest
import torch

from autocompress.accounting import rank_for
from autocompress.compress.apply import LowRankLinear, compress_model
from autocompress.compress.calibration import BlockRunner, collect_stats
from autocompress.compress.quant import fake_quantize
from autocompress.plan import LayerConfig, Plan, uniform_plan


def _calib(tiny_loaded, n=4, length=32):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, tiny_loaded.model.config.vocab_size, (n, length), generator=g)


def test_rtn_plan_quantizes_every_layer_and_leaves_original(tiny_loaded):
    plan = uniform_plan(tiny_loaded.identity, LayerConfig(bits=3))
    before = tiny_loaded.model.model.layers[0].self_attn.q_proj.weight.clone()
    model = compress_model(tiny_loaded, plan, progress=False)
    assert torch.equal(tiny_loaded.model.model.layers[0].self_attn.q_proj.weight, before)
    for layer in tiny_loaded.layers:
        w = tiny_loaded.module(layer.name).weight.float()
        got = model.get_submodule(layer.name).weight
        assert torch.allclose(got, fake_quantize(w, 3, 64, False), atol=1e-6)


def test_overrides_and_low_rank_install(tiny_loaded):
    name = "model.layers.1.mlp.down_proj"
    plan = Plan(model=tiny_loaded.identity, default=LayerConfig(bits=16),
                overrides={name: {"rank_ratio": 0.5}})
    model = compress_model(tiny_loaded, plan, progress=False)
    module = model.get_submodule(name)
    assert isinstance(module, LowRankLinear)
    assert module.down.weight.shape[0] == rank_for(64, 128, 0.5)
    q = model.get_submodule("model.layers.0.self_attn.q_proj").weight
    assert torch.equal(q, tiny_loaded.module("model.layers.0.self_attn.q_proj").weight.half().float())
    x = torch.randint(0, 300, (1, 16))
    assert torch.isfinite(model(x).logits).all()


def test_block_runner_matches_one_pass_stats(tiny_loaded):
    windows = _calib(tiny_loaded)
    layers = tiny_loaded.layers
    full = collect_stats(tiny_loaded.model, layers, windows, progress=False)
    runner = BlockRunner(tiny_loaded.model, windows)
    for block in (0, 1):
        block_layers = [l for l in layers if l.block == block]
        stats = runner.run_block(block, block_layers)
        for layer in block_layers:
            assert torch.allclose(stats[layer.name].hessian, full[layer.name].hessian, atol=1e-5)
        runner.advance(block)
    # q/k/v share one input: one Hessian object
    assert full[layers[0].name] is full[layers[1].name]


def _output_error(tiny_loaded, model, windows):
    with torch.no_grad():
        ref = tiny_loaded.model(windows).logits
        return (model(windows).logits - ref).square().mean().item()


def test_gptq_plan_beats_rtn_end_to_end(tiny_loaded):
    windows = _calib(tiny_loaded, n=8, length=64)
    rtn = compress_model(tiny_loaded, uniform_plan(tiny_loaded.identity, LayerConfig(bits=3)),
                         progress=False)
    gptq_cfg = LayerConfig(bits=3, method="gptq")
    seq = compress_model(tiny_loaded, uniform_plan(tiny_loaded.identity, gptq_cfg), windows,
                         mode="sequential", progress=False)
    par = compress_model(tiny_loaded, uniform_plan(tiny_loaded.identity, gptq_cfg), windows,
                         mode="parallel", progress=False)
    e_rtn = _output_error(tiny_loaded, rtn, windows)
    assert _output_error(tiny_loaded, seq, windows) < 0.8 * e_rtn
    assert _output_error(tiny_loaded, par, windows) < 0.8 * e_rtn


def test_statistics_keep_the_full_hessian_only_for_the_inputs_that_need_it(tiny_loaded):
    """llama.cpp's imatrix and Wanda read the diagonal of E[x xᵀ] only: the other inputs keep
    Σx² per column (on a 1.5B model the full matrices of every ffn_down input are 18 GB)."""
    windows = _calib(tiny_loaded)
    layers = tiny_loaded.layers
    full = collect_stats(tiny_loaded.model, layers, windows, progress=False)
    down = next(l for l in layers if l.kind == "down" and l.block == 1)
    diagonal = collect_stats(tiny_loaded.model, layers, windows, progress=False,
                             hessian_layers={down.name})
    for layer in layers:
        got, want = diagonal[layer.name], full[layer.name]
        assert (got.hessian is not None) == (layer.name == down.name), layer.name
        torch.testing.assert_close(got.mean_square, want.hessian.diagonal(), rtol=1e-5, atol=0)
        torch.testing.assert_close(got.act_norm, want.act_norm, rtol=1e-5, atol=0)
    torch.testing.assert_close(diagonal[down.name].hessian, full[down.name].hessian)


def test_an_imatrix_plan_builds_alike_from_diagonal_statistics_and_gptq_still_gets_h(tiny_loaded):
    from autocompress.compress.apply import hessian_layers, needs_hessian

    windows = _calib(tiny_loaded, n=8, length=64)
    imatrix = LayerConfig(gguf="q4_0", method="imatrix")
    gptq_name = next(l.name for l in tiny_loaded.layers if l.kind == "down")
    plan = Plan(model=tiny_loaded.identity, default=imatrix,
                overrides={gptq_name: {"gguf": None, "bits": 3, "method": "gptq"}})
    configs = plan.resolve_model(tiny_loaded)
    assert hessian_layers(tiny_loaded.layers, lambda l: [configs[l.name]]) == {gptq_name}
    assert not needs_hessian(imatrix)
    for mode in ("parallel", "sequential"):
        built = compress_model(tiny_loaded, plan, windows, mode=mode, progress=False)
        # the reference: statistics with every full E[x xᵀ], as before the diagonal-only path
        if mode == "parallel":
            stats = collect_stats(tiny_loaded.model, tiny_loaded.layers, windows, progress=False)
            reference = compress_model(tiny_loaded, plan, stats=stats, mode=mode, progress=False)
            for layer in tiny_loaded.layers:
                a = built.get_submodule(layer.name).weight
                b = reference.get_submodule(layer.name).weight
                # Σx² summed per batch is not bit-equal to diag(xᵀx): a rare rounding flips
                # (measured: 0.3% of one layer's weights, by 3e-5)
                assert (a == b).float().mean() > 0.99, layer.name
                assert (a - b).abs().max() < 1e-3, layer.name
        gptq_w = built.get_submodule(gptq_name).weight
        rtn_w = fake_quantize(tiny_loaded.module(gptq_name).weight.float(), 3, 64, False)
        assert not torch.allclose(gptq_w, rtn_w)  # GPTQ ran (with H), not plain rounding


def _mixed_configs(tiny_loaded):
    """RTN, GPTQ, a low-rank layer and the (tied) embedding in a GGUF type: every way a plan
    changes the model."""
    names = [layer.name for layer in tiny_loaded.layers]
    configs = {n: LayerConfig(bits=4, group_size=32, method="gptq") for n in names}
    configs[names[0]] = LayerConfig(bits=3)
    configs[names[1]] = LayerConfig(bits=8, rank_ratio=0.5)
    configs["model.embed_tokens"] = LayerConfig(gguf="q8_0")
    return configs


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_in_place_builds_the_copy_s_weights_and_restores_the_model_exactly(tiny_loaded):
    from autocompress.compress.apply import compressed_in_place

    configs, calib = _mixed_configs(tiny_loaded), _calib(tiny_loaded)
    original = _snapshot(tiny_loaded.model)
    copy = compress_model(tiny_loaded, configs, calib, progress=False)
    with compressed_in_place(tiny_loaded, configs, calib, progress=False) as model:
        assert model is tiny_loaded.model
        assert isinstance(model.get_submodule(tiny_loaded.layers[1].name), LowRankLinear)
        assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
        inside, built = model.state_dict(), copy.state_dict()
        assert inside.keys() == built.keys()
        assert [k for k in built if not torch.equal(inside[k], built[k])] == []
    after = tiny_loaded.model.state_dict()
    assert after.keys() == original.keys()
    assert [k for k in original if not torch.equal(after[k], original[k])] == []
    assert not isinstance(tiny_loaded.module(tiny_loaded.layers[1].name), LowRankLinear)


def test_in_place_restores_the_model_when_the_block_fails(tiny_loaded):
    from autocompress.compress.apply import compressed_in_place

    original = _snapshot(tiny_loaded.model)
    try:
        with compressed_in_place(tiny_loaded, _mixed_configs(tiny_loaded), _calib(tiny_loaded),
                                 progress=False) as model:
            assert not torch.equal(model.model.embed_tokens.weight,
                                   original["model.embed_tokens.weight"])
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    after = tiny_loaded.model.state_dict()
    assert [k for k in original if not torch.equal(after[k], original[k])] == []
    with compressed_in_place(tiny_loaded, {l.name: LayerConfig(bits=4)
                                           for l in tiny_loaded.layers}, progress=False):
        pass  # usable again: the in-place flag was cleared


def test_a_reference_cache_is_unchanged_by_a_plan_in_place_and_refuses_to_compute_inside(
        tiny_loaded):
    """The cache recomputes log-probs through the head it saw; a plan put into the model in
    place (its tied head quantized) must not change them, and a window not yet computed must
    not be computed from the compressed model."""
    from autocompress.compress.apply import compressed_in_place
    from autocompress.evaluate import ReferenceCache, log_probs

    windows = _calib(tiny_loaded, n=2)
    expected = [log_probs(tiny_loaded.model, w) for w in windows]
    cache = ReferenceCache(tiny_loaded.model, windows)
    cache.get(0)
    with compressed_in_place(tiny_loaded, _mixed_configs(tiny_loaded), windows, progress=False):
        assert torch.equal(cache.get(0), expected[0])
        with pytest.raises(RuntimeError, match="fill"):
            cache.get(1)
    assert torch.equal(cache.fill().get(1), expected[1])


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_a_plan_held_as_codes_computes_what_its_dense_weights_compute(tiny_loaded, mode):
    """The meters hold quantized layers as codes (CodesLinear): the model's outputs must be
    the dense build's bit for bit, and the model restored exactly after."""
    from autocompress.compress.apply import compressed_in_place
    from autocompress.compress.codes_linear import CodesLinear

    configs, calib = _mixed_configs(tiny_loaded), _calib(tiny_loaded)
    configs[tiny_loaded.layers[2].name] = LayerConfig(bits=4, group_size=-1, sym=True)
    x = _calib(tiny_loaded, n=2, length=24)
    original = _snapshot(tiny_loaded.model)
    with compressed_in_place(tiny_loaded, configs, calib, mode=mode, progress=False) as model:
        dense = model(x).logits
        dense_weights = {l.name: model.get_submodule(l.name).weight.clone()
                         for l in tiny_loaded.layers[2:]}
    with compressed_in_place(tiny_loaded, configs, calib, mode=mode, progress=False,
                             codes=True) as model:
        held = [l.name for l in tiny_loaded.layers
                if isinstance(model.get_submodule(l.name), CodesLinear)]
        assert held == [l.name for l in tiny_loaded.layers if l.name != tiny_loaded.layers[1].name]
        assert torch.equal(model(x).logits, dense)
        for name, weight in dense_weights.items():
            assert torch.equal(model.get_submodule(name).weight, weight), name
    after = tiny_loaded.model.state_dict()
    assert [k for k in original if not torch.equal(after[k], original[k])] == []
    assert not any(isinstance(tiny_loaded.module(l.name), CodesLinear) for l in tiny_loaded.layers)


def test_decoding_codes_in_groups_equals_dequantize():
    from autocompress.compress.codes_linear import decode
    from autocompress.compress.quant import quantize_rtn

    w = torch.randn(48, 96)
    for bits, group, sym in [(4, 32, False), (3, -1, True), (2, 64, False), (8, 96, True)]:
        q = quantize_rtn(w, bits, group, sym)
        assert torch.equal(decode(q), q.dequantize()), (bits, group, sym)


@pytest.mark.parametrize("bits, width, packed", [(4, 64, True), (2, 64, True), (3, 40, True),
                                                 (4, 33, False), (8, 64, False)])
def test_codes_of_four_bits_or_fewer_are_held_two_to_a_byte(bits, width, packed):
    from autocompress.compress.codes_linear import CodesLinear
    from autocompress.compress.quant import quantize_rtn

    w = torch.randn(6, width, generator=torch.Generator().manual_seed(0))
    qw = quantize_rtn(w, bits, 32, False)
    layer = CodesLinear(qw, None, torch.float32)
    assert torch.equal(layer.quantized.q, qw.q)
    assert torch.equal(layer.weight, qw.dequantize())
    code_bytes = layer.held_bytes() - qw.scale.numel() * 4 - qw.zero.numel() * 4
    assert code_bytes == (6 * width // 2 if packed else 6 * width)
