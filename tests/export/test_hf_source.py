"""GGUF export of a Hugging Face Llama directory: a tiny random Llama at a mixed plan runs in
llama.cpp as `eval` measured it; SmolLM2's directory gets the metadata and tokenizer its own
GGUF has; what the export cannot write is refused in one line."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from autocompress.errors import AutocompressError
from autocompress.evaluate import evaluate
from autocompress.export import gguf as gguf_export
from autocompress.export.hf_source import hf_fields
from autocompress.plan import LayerConfig, Plan

from ..conftest import make_tiny_model_dir

llamacpp = pytest.importorskip("autocompress.engines.llamacpp")


@pytest.fixture(scope="module")
def sharp_tiny(tmp_path_factory):
    """A tiny random Llama whose weights are large enough (std 0.15, not 0.02) that attention is
    far from uniform: with the usual init every q/k row order gives the same logits, so a
    wrong reordering would pass unseen."""
    from autocompress.model import load_model

    return load_model(str(make_tiny_model_dir(tmp_path_factory.mktemp("sharp"), seed=1,
                                              init_std=0.15)))


def _windows(tokenizer, n=4, length=64):
    from pydoc_data.topics import topics

    ids = tokenizer(" ".join(list(topics.values())[:6]), return_tensors="pt").input_ids[0]
    return ids[: n * length].reshape(n, length)


def _mixed_plan(loaded) -> Plan:
    return Plan(model=loaded.identity, default=LayerConfig(gguf="q8_0"),
                overrides={"re:.*mlp.*": {"gguf": "q4_0"}, "re:.*v_proj": {"gguf": "q5_1"},
                           "model.embed_tokens": {"gguf": "q5_1"}})


def test_a_tiny_llama_at_a_mixed_plan_runs_in_llamacpp_as_eval_measured_it(sharp_tiny, tmp_path,
                                                                           monkeypatch):
    from autocompress.compress.reproduce import build_model

    plan = _mixed_plan(sharp_tiny)
    made = gguf_export.export_gguf(sharp_tiny, plan, tmp_path / "tiny.gguf", progress=False)
    assert made.types == {"q8_0": 6, "q4_0": 6, "q5_1": 3, "f32": 5}  # 2 blocks; norms f32
    windows = _windows(sharp_tiny.tokenizer)
    built = build_model(sharp_tiny, plan, progress=False)
    torch_run = evaluate(built, windows, reference=sharp_tiny.model, progress=False)
    engine = llamacpp.LlamaCppEngine(made.path, n_ctx=64, threads=1)
    llama_run = evaluate(engine, windows, reference=built, progress=False)
    engine.close()
    assert llama_run.ppl == pytest.approx(torch_run.ppl, rel=0.02)
    # the same weights in two engines: far closer than the plan is to the float model
    assert llama_run.kl < 0.05 * torch_run.kl

    # the control: the same file with q and k rows left in Hugging Face's order is far off
    monkeypatch.setattr(gguf_export, "to_gguf_rows", lambda name, data, *heads: data)
    broken = gguf_export.export_gguf(sharp_tiny, plan, tmp_path / "broken.gguf", progress=False)
    engine = llamacpp.LlamaCppEngine(broken.path, n_ctx=64, threads=1)
    wrong = evaluate(engine, windows, reference=built, progress=False)
    engine.close()
    assert wrong.kl > 20 * max(llama_run.kl, 1e-4)


def _fake(loaded, **config_changes):
    config = SimpleNamespace(**{**loaded.config.to_dict(), **config_changes})
    return SimpleNamespace(config=config, tokenizer=loaded.tokenizer, spec="some/dir",
                           name="m")


def test_what_a_directory_export_cannot_write_is_refused_in_one_line(tiny_loaded):
    with pytest.raises(AutocompressError, match="knows the llama architecture.*'mistral'.*"
                                                "convert_hf_to_gguf.py"):
        hf_fields(_fake(tiny_loaded, model_type="mistral"))
    with pytest.raises(AutocompressError, match="RoPE scaling 'yarn'"):
        hf_fields(_fake(tiny_loaded, rope_parameters={"rope_type": "yarn", "factor": 4.0}))
    unigram = SimpleNamespace(**{**vars(_fake(tiny_loaded)), "tokenizer": SimpleNamespace(
        backend_tokenizer=SimpleNamespace(to_str=lambda: '{"model": {"type": "Unigram"}}'))})
    with pytest.raises(AutocompressError, match="byte-level BPE.*Unigram"):
        hf_fields(unigram)


def test_ids_the_tokenizer_leaves_unused_are_padded_to_the_models_vocabulary(tiny_loaded):
    fields = {f.name: f.value for f in hf_fields(_fake(tiny_loaded, vocab_size=400))}
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    n = len(tiny_loaded.tokenizer)
    assert len(tokens) == len(types) == 400
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, 400)] and set(types[n:]) == {5}
    assert types[1] == 3 and tokens[1] == "<s>"  # special tokens are control tokens
    assert fields["llama.vocab_size"] == 400 and fields["tokenizer.ggml.pre"] == "gpt-2"


@pytest.mark.integration
def test_smollm2s_directory_gets_the_metadata_and_tokenizer_of_its_own_gguf(real_loaded):
    """real_loaded is SmolLM2 as the Hugging Face directory its GGUF converts to: written
    back from that directory, every llama.* key and the whole tokenizer equal the bundled
    file's. The pre-tokenizer name is the one thing not recoverable (llama.cpp's converter
    finds "smollm" by hashing tokenizer output)."""
    from gguf import GGUFReader

    from autocompress.model import resolve_alias

    ours = {f.name: f.value for f in hf_fields(real_loaded)}
    file = {f.name: f.contents() for f in GGUFReader(resolve_alias("smollm2-135m")).fields.values()}
    compared = [k for k in ours if k not in ("general.name", "tokenizer.ggml.pre")]
    assert len(compared) >= 19 and len(ours["tokenizer.ggml.tokens"]) == 49152
    for key in compared:
        assert ours[key] == pytest.approx(file[key], rel=1e-6) if isinstance(ours[key], float) \
            else ours[key] == file[key], key
