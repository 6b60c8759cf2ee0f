import pytest

from autocompress.errors import AutocompressError
from autocompress.model import load_model, model_identity, non_layer_params


def test_layer_discovery(tiny_loaded):
    layers = tiny_loaded.layers
    assert len(layers) == 2 * 7
    assert [l.kind for l in layers[:7]] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert {l.block for l in layers} == {0, 1}
    down = layers[6]
    assert down.name == "model.layers.0.mlp.down_proj" and down.shape == (64, 128)
    assert tiny_loaded.head.kind == "lm_head"


def test_identity_depends_on_shapes(tiny_loaded):
    ident = tiny_loaded.identity
    assert ident.content_hash == model_identity("other-name", tiny_loaded.layers).content_hash
    assert ident.source == tiny_loaded.spec
    assert len(ident.layers) == len(tiny_loaded.layers)


def test_non_layer_params_counts_tied_embedding_once(tiny_loaded):
    model = tiny_loaded.model
    embed = model.model.embed_tokens.weight.numel()
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert non_layer_params(tiny_loaded) == embed + norms


@pytest.mark.parametrize("spec", ["no-such-model", "/nonexistent/dir"])
def test_unknown_model(spec):
    with pytest.raises(AutocompressError, match="unknown model"):
        load_model(spec)


def test_directory_without_config(tmp_path):
    with pytest.raises(AutocompressError, match="config.json"):
        load_model(str(tmp_path))
