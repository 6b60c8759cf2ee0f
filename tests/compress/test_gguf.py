"""GGUF types as plan formats: llama.cpp's quantizer inside a plan's build (the weights the
torch engine computes with are the GGUF bytes decoded), the importance matrix taken from the
calibration statistics, and the embedding compressed with its tied head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("xllamacpp", reason="llama.cpp (pip install 'autocompress[llamacpp]')")

from autocompress.accounting import layer_bytes  # noqa: E402
from autocompress.compress.apply import compress_model, needs_calibration  # noqa: E402
from autocompress.compress.weights import LayerStats, compress_weight  # noqa: E402
from autocompress.engines.llamacpp import dequantize, quantize  # noqa: E402
from autocompress.errors import AutocompressError  # noqa: E402
from autocompress.gguf_types import GGUF_TYPES  # noqa: E402
from autocompress.plan import LayerConfig, Plan, uniform_plan  # noqa: E402


@pytest.fixture(scope="module")
def weight():
    torch.manual_seed(0)
    w = torch.randn(24, 512) * 0.02
    w[:, 5] *= 30  # an outlier column
    return w


@pytest.mark.parametrize("name", ["q4_k", "q3_k", "q8_0", "iq4_nl", "bf16"])
def test_a_gguf_layer_is_llama_cpps_bytes_decoded(weight, name):
    compressed = compress_weight(weight, LayerConfig(gguf=name))
    stored = compressed.quantized[0]
    expected = quantize(weight.numpy(), name)
    assert stored.type.name == name and stored.data.tobytes() == expected.tobytes()
    assert torch.equal(compressed.factors[0],
                       torch.from_numpy(dequantize(expected, name, tuple(weight.shape))))
    assert stored.nbytes == layer_bytes(*weight.shape, LayerConfig(gguf=name))


@pytest.mark.parametrize("name", sorted(set(GGUF_TYPES) - {"f32", "f16", "bf16"}))
def test_rows_quantize_independently_so_reordering_rows_reorders_the_bytes(weight, name):
    """GGUF export writes q and k in llama.cpp's row order by permuting the plan's bytes; that
    is exact only if each row's blocks depend on that row (and the imatrix) alone."""
    perm = torch.randperm(weight.shape[0], generator=torch.Generator().manual_seed(1)).numpy()
    importance = np.linspace(0.1, 3.0, weight.shape[1], dtype=np.float32)
    whole = quantize(weight.numpy(), name, importance)
    assert quantize(weight.numpy()[perm], name, importance).tobytes() == whole[perm].tobytes()


def test_imatrix_is_the_mean_square_of_each_input_column_and_lowers_its_weighted_error(weight):
    torch.manual_seed(1)
    x = torch.randn(4000, 512)
    x[:, ::8] *= 6  # outlier channels, as real activations have
    H = x.T @ x / x.shape[0]
    stats = LayerStats(H=H, act_norm=None, n_samples=x.shape[0])
    plain = compress_weight(weight, LayerConfig(gguf="q3_k")).factors[0]
    weighted = compress_weight(weight, LayerConfig(gguf="q3_k", method="imatrix"),
                               stats).factors[0]
    mean_square = H.diagonal()  # llama-imatrix's value: mean x² of each column
    assert torch.allclose(mean_square, (x ** 2).mean(0), rtol=1e-4)
    expected = quantize(weight.numpy(), "q3_k", mean_square.numpy())
    assert torch.equal(weighted, torch.from_numpy(dequantize(expected, "q3_k", (24, 512))))

    def output_error(w_hat):  # what the importance stands for: error in the layer's output
        return float(((x @ (w_hat - weight).T) ** 2).mean())

    assert output_error(weighted) < 0.85 * output_error(plain)  # measured: 0.74


def test_imatrix_without_calibration_is_refused(weight):
    assert needs_calibration([LayerConfig(gguf="q4_k", method="imatrix")])
    assert not needs_calibration([LayerConfig(gguf="q4_k")])
    with pytest.raises(AutocompressError, match="imatrix needs calibration"):
        compress_weight(weight, LayerConfig(gguf="q4_k", method="imatrix"))


def test_a_gguf_plan_compresses_the_embedding_and_its_tied_head(tiny_loaded):
    plan = uniform_plan(tiny_loaded.identity, LayerConfig(gguf="q4_0"))
    plan = Plan(model=plan.model, default=plan.default, provenance=plan.provenance,
                overrides={"model.embed_tokens": {"gguf": "q4_0"}})
    model = compress_model(tiny_loaded, plan, progress=False)
    original = tiny_loaded.model.get_input_embeddings().weight
    embedding = model.get_input_embeddings().weight
    expected = dequantize(quantize(original.detach().numpy(), "q4_0"), "q4_0",
                          tuple(original.shape))
    assert torch.equal(embedding, torch.from_numpy(expected))
    assert model.lm_head.weight is embedding  # llama.cpp reads token_embd for both
    layer = tiny_loaded.layers[3]
    assert not torch.equal(model.get_submodule(layer.name).weight,
                           tiny_loaded.module(layer.name).weight)
    # without the override the embedding is left as it is
    untouched = compress_model(tiny_loaded, uniform_plan(tiny_loaded.identity,
                                                         LayerConfig(gguf="q4_0")), progress=False)
    assert torch.equal(untouched.get_input_embeddings().weight, original)


def test_the_packed_runtime_refuses_gguf_layers_and_names_export(tiny_loaded):
    from autocompress.runtime.convert import pack_model

    with pytest.raises(AutocompressError, match="export PLAN --format gguf"):
        pack_model(tiny_loaded, uniform_plan(tiny_loaded.identity, LayerConfig(gguf="q8_0")),
                   progress=False)
