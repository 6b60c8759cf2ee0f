"""llama.cpp running the bundled SmolLM2 GGUF against torch running its dequantized weights:
the same windows, the same metrics code, the same numbers within 2%."""

import json

import pytest

from autocompress.cli import main

from ..conftest import EVAL_TEXT, require_shared_data

pytestmark = pytest.mark.integration
pytest.importorskip("xllamacpp", reason="llama.cpp (pip install 'autocompress[llamacpp]')")


def test_eval_in_llamacpp_agrees_with_torch_on_the_same_windows(real_loaded, tmp_path, capsys):
    from autocompress.model import resolve_alias

    require_shared_data()
    plan = tmp_path / "f16.json"
    assert main(["plan", "--model", "smollm2-135m", "--bits", "16", "--out", str(plan)]) == 0
    common = ["eval", str(plan), "--eval-text", str(EVAL_TEXT), "--windows", "2",
              "--window-len", "256", "--json"]
    capsys.readouterr()
    assert main(common) == 0
    torch_run = json.loads(capsys.readouterr().out)
    gguf = resolve_alias("smollm2-135m")
    assert main(common + ["--engine", "llamacpp", "--gguf", str(gguf)]) == 0
    llama_run = json.loads(capsys.readouterr().out)
    assert llama_run["engine"] == "llamacpp" and llama_run["tokens"] == torch_run["tokens"] == 510
    # the GGUF's Q4_1 weights are what torch runs (dequantized once): only kernels differ
    assert llama_run["ppl"] == pytest.approx(torch_run["ppl"], rel=0.02)
    assert 0 < llama_run["kl"] < 0.02  # llama.cpp's float paths against torch's float32
    assert llama_run["gguf_bytes"] == gguf.stat().st_size


def test_decode_speed_is_measured_without_disturbing_the_logits():
    """Decode at batch 1 (one llama_decode per token): a positive rate, and the context is
    left as a window evaluation expects (same logits before and after)."""
    import math

    import torch

    from autocompress.engines.llamacpp import LlamaCppEngine
    from autocompress.model import resolve_alias

    engine = LlamaCppEngine(resolve_alias("smollm2-135m"), n_ctx=64, threads=2)
    window = torch.arange(1, 33)
    before = engine.window_logits(window)
    rate = engine.decode_tokens_per_s(n_tokens=16, prompt=8)
    assert math.isfinite(rate) and rate > 1.0  # SmolLM2 decodes at tens of tokens/s here
    assert torch.allclose(engine.window_logits(window), before, atol=1e-4)
    with pytest.raises(Exception, match="exceed the llama.cpp context"):
        engine.decode_tokens_per_s(n_tokens=60, prompt=8)
    engine.close()


def test_profile_engine_llamacpp_measures_each_type_and_predicts_its_own_files(real_loaded,
                                                                               tmp_path):
    """Two types: q8_0 (the reference) and q4_0; the fit reproduces both files' measured
    speeds (two files, two unknowns), and q4_0, read in fewer bytes, decodes faster."""
    from autocompress.cli import main
    from autocompress.hardware.llamacpp_speed import LlamaCppSpeed

    out = tmp_path / "speed.yaml"
    assert main(["profile", "--engine", "llamacpp", "--model", "smollm2-135m",
                 "--formats", "q4_0", "--out", str(out)]) == 0
    speed = LlamaCppSpeed.load(out)
    assert [f["type"] for f in speed.files] == ["q8_0", "q4_0"]
    for f in speed.files:
        assert 1 / speed.predict_s(f["weights"]) == pytest.approx(f["tokens_per_s"], rel=1e-6)
    assert speed.per_weight_s["q4_0"] < 0  # relative to q8_0: fewer bytes per weight
