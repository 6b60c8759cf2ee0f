"""Packed storage and QuantLinear against the fake-quant weights of compress/."""

import itertools

import pytest
import torch

from autocompress.accounting import layer_bytes
from autocompress.compress.apply import compress_model
from autocompress.compress.weights import compress_weight
from autocompress.errors import AutocompressError
from autocompress.plan import LayerConfig, uniform_plan
from autocompress.runtime.convert import (
    apply_packed,
    load_packed,
    pack_model,
    quant_linears,
    save_packed,
)
from autocompress.runtime.modules import QuantLinear
from autocompress.runtime.packed import PackedLinear

# float16 scales (the accounting's format) against quant.py's float32 ones: relative weight
# error ≤ 2^-11 per group, so outputs agree to ~1e-3 of their scale
FP16_GRID_RTOL = 2e-3


def configs():
    for bits, group, sym in itertools.product((2, 3, 4, 5, 6, 8, 16), (32, -1), (False, True)):
        yield LayerConfig(bits=bits, group_size=group, sym=sym)
    for bits, pattern in itertools.product((3, 4, 16), ("unstructured", "2:4")):
        yield LayerConfig(bits=bits, group_size=32, pattern=pattern, sparsity=0.5,
                          prune_method="magnitude")
    yield LayerConfig(bits=4, group_size=32, rank_ratio=0.5)
    yield LayerConfig(bits=3, group_size=32, sparsity=0.3, prune_method="magnitude", rank_ratio=0.6)


@pytest.mark.parametrize("shape", [(24, 72), (13, 44), (33, 100)])
def test_packed_matches_fake_quant_and_accounting(shape):
    torch.manual_seed(0)
    w = torch.randn(*shape)
    w[0] = w[0].abs() + 0.5  # one all-positive row: zero points outside [0, 2^b - 1]
    for cfg in configs():
        if cfg.pattern == "2:4" and shape[1] % 4:
            continue
        compressed = compress_weight(w, cfg)
        packed = PackedLinear.from_compressed(compressed, cfg)
        assert packed.nbytes() == layer_bytes(*shape, cfg), cfg.short()
        ref = compressed.weight()
        err = (packed.dequantize() - ref).abs().max() / ref.abs().max()
        assert err < FP16_GRID_RTOL, cfg.short()


@pytest.mark.parametrize("cfg", list(configs()), ids=lambda c: c.short())
def test_quant_linear_torch_backend_matches_dequantized(cfg):
    torch.manual_seed(1)
    w = torch.randn(40, 96)
    packed = PackedLinear.from_compressed(compress_weight(w, cfg), cfg)
    bias = torch.randn(40)
    layer = QuantLinear(packed, bias, backend="torch")
    x = torch.randn(2, 3, 96)
    ref = x @ packed.dequantize().T + bias
    y = layer(x)
    assert y.shape == (2, 3, 40)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_ort_backend_refuses_formats_it_has_no_kernel_for_in_one_line():
    cfg = LayerConfig(bits=3, group_size=32)
    packed = PackedLinear.from_compressed(compress_weight(torch.randn(8, 64), cfg), cfg)
    with pytest.raises(AutocompressError) as info:
        QuantLinear(packed, backend="ort", name="model.layers.0.mlp.up_proj")
    message = str(info.value)
    assert "\n" not in message
    assert "3-bit" in message and "model.layers.0.mlp.up_proj" in message and "'torch'" in message


def test_unknown_backend_is_a_clear_error():
    cfg = LayerConfig(bits=4)
    packed = PackedLinear.from_compressed(compress_weight(torch.randn(8, 64), cfg), cfg)
    with pytest.raises(AutocompressError, match="unknown backend"):
        QuantLinear(packed, backend="cuda")


MIXED = {"default": LayerConfig(bits=4, group_size=32),
         "overrides": {"re:.*mlp\\.down_proj": {"bits": 3},
                       "re:.*self_attn\\.v_proj": {"bits": 8, "sym": True},
                       "re:.*self_attn\\.k_proj": {"bits": 16},
                       "re:.*layers\\.1\\.mlp\\.up_proj": {"rank_ratio": 0.5}}}


def mixed_plan(loaded):
    plan = uniform_plan(loaded.identity, MIXED["default"])
    plan.overrides = dict(MIXED["overrides"])
    return plan


@torch.no_grad()
def test_packed_model_matches_fake_quant_model(tiny_loaded):
    plan = mixed_plan(tiny_loaded)
    ids = torch.randint(0, tiny_loaded.model.config.vocab_size, (1, 12))
    fake = compress_model(tiny_loaded, plan, progress=False)(ids).logits
    packed_model = pack_model(tiny_loaded, plan, backend="torch", progress=False)
    layers = quant_linears(packed_model)
    assert len(layers) == len(tiny_loaded.layers)
    configs = plan.resolve(layer.name for layer in tiny_loaded.layers)
    for layer in tiny_loaded.layers:
        assert layers[layer.name].packed.nbytes() == layer_bytes(*layer.shape, configs[layer.name])
    logits = packed_model(ids).logits
    torch.testing.assert_close(logits, fake, rtol=0, atol=FP16_GRID_RTOL * float(fake.abs().max()))


@torch.no_grad()
def test_auto_backend_runs_3_bit_layers_widened_on_ort(tiny_loaded):
    from autocompress.runtime.cpu_kernels import ort_available

    if not ort_available():
        pytest.skip("onnxruntime not installed")
    plan = uniform_plan(tiny_loaded.identity, LayerConfig(bits=3, group_size=32))
    ids = torch.randint(0, tiny_loaded.model.config.vocab_size, (1, 12))
    fake = compress_model(tiny_loaded, plan, progress=False)(ids).logits
    packed_model = pack_model(tiny_loaded, plan, backend="auto", progress=False)
    backends = {m.backend for m in quant_linears(packed_model).values()}
    assert backends == {"ort-widened"}  # q/k/v and gate/up in shared sessions too
    logits = packed_model(ids).logits  # ORT's int8 activations: about 1% of the largest logit
    assert float((logits - fake).abs().max()) < 0.05 * float(fake.abs().max())


@torch.no_grad()
def test_save_and_load_round_trip(tiny_loaded, tmp_path):
    plan = mixed_plan(tiny_loaded)
    ids = torch.randint(0, tiny_loaded.model.config.vocab_size, (2, 9))
    packed_model = pack_model(tiny_loaded, plan, backend="torch", progress=False)
    expected = packed_model(ids).logits
    save_packed(packed_model, tmp_path / "packed", plan, tiny_loaded.tokenizer)
    loaded = load_packed(tmp_path / "packed", backend="torch")
    assert loaded.plan is not None and loaded.tokenizer is not None
    torch.testing.assert_close(loaded.model(ids).logits, expected, rtol=0, atol=1e-5)
    # ORT where it has kernels (2/4/8 bits), torch elsewhere: int8 activations, looser
    auto = load_packed(tmp_path / "packed", backend="auto")
    layers = quant_linears(auto.model)
    backends = {m.backend for m in layers.values()}
    assert "ort" in backends and "torch" in backends
    # q and v (4 and 8 bits) share one ORT session; k (16 bits) runs on torch
    q, v = (layers[f"model.layers.0.self_attn.{p}_proj"].kernels[0] for p in "qv")
    assert q.group is v.group
    logits = auto.model(ids).logits
    assert (logits - expected).abs().max() < 0.05 * expected.abs().max()


def test_saving_an_ort_model_without_its_packed_weights_is_refused(tiny_loaded, tmp_path):
    plan = uniform_plan(tiny_loaded.identity, LayerConfig(bits=4, group_size=32))
    model = pack_model(tiny_loaded, plan, backend="ort", progress=False)
    with pytest.raises(AutocompressError, match="keep_packed"):
        save_packed(model, tmp_path / "x")


def test_apply_packed_writes_the_accounted_bytes(tiny_loaded, tmp_path):
    plan = mixed_plan(tiny_loaded)
    sizes = apply_packed(tiny_loaded, plan, tmp_path / "out", progress=False)
    assert sizes["packed_layer_bytes"] == sizes["accounted_layer_bytes"]
    assert (tmp_path / "out" / "packed.safetensors").is_file()
    assert (tmp_path / "out" / "plan.json").is_file()


def test_load_packed_refuses_other_directories(tmp_path):
    with pytest.raises(AutocompressError, match="not a packed model directory"):
        load_packed(tmp_path)


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
@torch.no_grad()
def test_calibrated_plans_pack_what_compress_model_computes(tiny_loaded, mode):
    plan = uniform_plan(tiny_loaded.identity, LayerConfig(bits=4, group_size=32, method="gptq"))
    plan.overrides = {"re:.*mlp\\..*": {"method": "rtn", "sparsity": 0.5},  # Wanda
                      "re:.*self_attn\\.k_proj": {"bits": 16}}
    gen = torch.Generator().manual_seed(0)
    vocab = tiny_loaded.model.config.vocab_size
    windows = torch.randint(0, vocab, (4, 24), generator=gen)
    ids = torch.randint(0, vocab, (1, 10), generator=gen)
    fake = compress_model(tiny_loaded, plan, windows, mode=mode, progress=False)(ids).logits
    packed = pack_model(tiny_loaded, plan, windows, mode=mode, backend="torch", progress=False)
    logits = packed(ids).logits
    torch.testing.assert_close(logits, fake, rtol=0, atol=FP16_GRID_RTOL * float(fake.abs().max()))


def test_gptq_without_calibration_is_a_clear_error(tiny_loaded):
    plan = uniform_plan(tiny_loaded.identity, LayerConfig(bits=4, method="gptq"))
    with pytest.raises(AutocompressError, match="calibration"):
        pack_model(tiny_loaded, plan, progress=False)


def test_resident_memory_of_packed_layers_matches_accounting(tmp_path):
    """Load packed layers from disk and build their torch kernels: the heap grows by the plan's
    bytes (within 5%), and no float copy of any weight is kept."""
    from autocompress.runtime.convert import load_packed_layers
    from autocompress.runtime.memory import heap_available, heap_in_use

    if not heap_available():
        pytest.skip("needs glibc's mallinfo2")
    cfgs = [LayerConfig(bits=4, group_size=64), LayerConfig(bits=3, group_size=128, sym=True),
            LayerConfig(bits=2, group_size=32, pattern="2:4", sparsity=0.5,
                        prune_method="magnitude")]
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 384, bias=False) for _ in cfgs])
    packed = {str(i): PackedLinear.from_compressed(compress_weight(m.weight, c), c)
              for i, (m, c) in enumerate(zip(model, cfgs))}
    from autocompress.runtime.convert import install_packed

    install_packed(model, packed, backend="torch")
    save_packed(model, tmp_path / "p")
    accounted = sum(layer_bytes(384, 512, c) for c in cfgs)
    del model, packed
    before = heap_in_use()
    layers, _ = load_packed_layers(tmp_path / "p")
    modules = [QuantLinear(layers.pop(name), backend="torch") for name in list(layers)]
    held = heap_in_use() - before
    assert sum(m.nbytes() for m in modules) == accounted
    assert abs(held - accounted) <= 0.05 * accounted, (held, accounted)
