"""A layer whose plan type is the one its source GGUF stores it in keeps the stored bytes, as
llama-quantize copies a tensor already in its target type: in the exported file, in the torch
build the search measures, and in the sensitivity table. Plans that do not record it are built
as before (quantized again)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from autocompress.compress.reproduce import build_model
from autocompress.compress.weights import compress_weight
from autocompress.model import load_model
from autocompress.plan import LayerConfig, Plan
from autocompress.provenance import Provenance

from .conftest import make_tiny_model_dir

pytest.importorskip("xllamacpp", reason="llama.cpp (pip install 'autocompress[llamacpp]')")
from autocompress.export.gguf import export_gguf  # noqa: E402
from autocompress.gguf_source import source_tensors  # noqa: E402


def _plan(loaded, copy_source: bool = True) -> Plan:
    return Plan(model=loaded.identity, default=LayerConfig(gguf="q4_k"),
                overrides={"re:.*v_proj": {"gguf": "q6_k"}, "model.embed_tokens": {"gguf": "q8_0"}},
                provenance=Provenance(gguf_source_copy=copy_source))


@pytest.fixture(scope="module")
def k_quant_source(tmp_path_factory):
    """A tiny Llama with 256-wide rows (whole k-quant super-blocks), exported at q4_k (attn_v
    q6_k) and loaded back from that GGUF. llama.cpp's k-quant quantizers search their scales, so
    quantizing these decoded weights to q4_k again does not give the stored bytes back."""
    directory = make_tiny_model_dir(tmp_path_factory.mktemp("wide"), seed=3, init_std=0.1,
                                    hidden_size=256, intermediate_size=512)
    tiny = load_model(str(directory))
    path = tmp_path_factory.mktemp("source") / "source.gguf"
    export_gguf(tiny, _plan(tiny), path, progress=False)
    return load_model(str(path))


def _tensors(path) -> dict[str, bytes]:
    from gguf import GGUFReader

    return {t.name: np.asarray(t.data).tobytes() for t in GGUFReader(path).tensors}


def test_the_source_types_export_the_source_tensors_and_requantizing_would_not(k_quant_source,
                                                                               tmp_path):
    source = _tensors(k_quant_source.spec)
    kept = _tensors(export_gguf(k_quant_source, _plan(k_quant_source), tmp_path / "kept.gguf",
                                progress=False).path)
    assert [name for name in source if kept[name] != source[name]] == []
    # the control, and how a plan that predates the record is still built: quantized again
    again = _tensors(export_gguf(k_quant_source, _plan(k_quant_source, copy_source=False),
                                 tmp_path / "again.gguf", progress=False).path)
    changed = [name for name in source if again[name] != source[name]]
    # (the ffn tensors are q4_k, attn_v q6_k; deterministic for this seed)
    assert any(".ffn_" in name for name in changed) and any(".attn_v." in n for n in changed)


def test_the_torch_build_computes_with_the_stored_weights(k_quant_source):
    plan = _plan(k_quant_source)
    plan = dataclasses.replace(plan, overrides={**plan.overrides,
                                                "re:.*up_proj": {"gguf": "q5_k"}})
    built = build_model(k_quant_source, plan, progress=False)
    for layer in k_quant_source.layers:
        same = torch.equal(built.get_submodule(layer.name).weight,
                           k_quant_source.module(layer.name).weight)
        assert same == (layer.kind != "up"), layer.name  # q5_k is not the stored type


def test_a_weight_that_is_no_longer_the_stored_one_is_quantized(k_quant_source):
    layer = k_quant_source.layers[0]
    stored = source_tensors(k_quant_source).stored(layer.name)
    assert stored.type.name == "q4_k" and stored.shape == (layer.out_features,
                                                            layer.in_features)
    weight = k_quant_source.module(layer.name).weight.detach().float()
    cfg = LayerConfig(gguf="q4_k")
    kept = compress_weight(weight, cfg, source=stored)
    assert torch.equal(kept.weight(), weight) and kept.quantized[0] is stored
    moved = compress_weight(weight * 1.01, cfg, source=stored)
    assert moved.quantized[0] is not stored
    assert not np.array_equal(moved.quantized[0].data, stored.data)


def test_a_model_from_a_directory_has_no_source_tensors(tiny_loaded):
    assert source_tensors(tiny_loaded) is None
