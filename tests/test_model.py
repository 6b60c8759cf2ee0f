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


def test_a_damaged_cached_conversion_is_rebuilt_and_said(tiny_model_dir, tmp_path, monkeypatch,
                                                         capsys):
    """The GGUF cache is the tool's own: a truncated entry is rebuilt, not a traceback."""
    import shutil

    import autocompress.model as model_module

    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path / "cache"))
    entry = model_module.cache_dir() / "models" / "tiny-0000"

    def convert(spec):  # stands in for the GGUF conversion (minutes for a real model)
        if not (entry / "config.json").is_file():
            shutil.copytree(tiny_model_dir, entry)
        return "tiny", entry

    monkeypatch.setattr(model_module, "resolve_model_path", convert)
    convert("tiny")
    data = (entry / "model.safetensors").read_bytes()
    (entry / "model.safetensors").write_bytes(data[: len(data) // 3])
    loaded = model_module.load_model("tiny")
    assert "is damaged" in capsys.readouterr().err
    assert len(loaded.layers) == 14
    assert (entry / "model.safetensors").read_bytes() == data
