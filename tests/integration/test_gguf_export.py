"""`export --format gguf` on the bundled SmolLM2 GGUF: a plan of the source's own types writes
the source back byte for byte, and a k-quant plan with an importance matrix writes a file that
llama.cpp runs with the perplexity `eval` measured for the plan in torch."""

import json

import numpy as np
import pytest

from autocompress.cli import main

from ..conftest import EVAL_TEXT, require_shared_data

pytestmark = pytest.mark.integration
pytest.importorskip("xllamacpp", reason="llama.cpp (pip install 'autocompress[llamacpp]')")


def _tensors(path):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return {t.name: (t.tensor_type, np.asarray(t.data).tobytes()) for t in reader.tensors}, fields


def test_a_plan_of_the_sources_types_exports_the_source_byte_for_byte(real_loaded, tmp_path):
    """SmolLM2's file is Q4_1 with a Q8_0 embedding: the same plan, requantized from its
    decoded weights, must give every tensor back exactly (names, q/k row order, block bytes,
    metadata, tokenizer); a wrong permutation or a second rounding would not."""
    from autocompress.model import resolve_alias

    plan, out = tmp_path / "q4_1.json", tmp_path / "q4_1.gguf"
    assert main(["plan", "--model", "smollm2-135m", "--gguf", "q4_1",
                 "--token-embedding-type", "q8_0", "--out", str(plan)]) == 0
    assert main(["export", str(plan), "--format", "gguf", "--out", str(out)]) == 0
    source_tensors, source_fields = _tensors(resolve_alias("smollm2-135m"))
    tensors, fields = _tensors(out)
    assert tensors.keys() == source_tensors.keys()
    assert [n for n in tensors if tensors[n] != source_tensors[n]] == []
    assert fields.pop("autocompress.plan") == "q4_1"
    assert fields == source_fields


def test_a_k_quant_export_runs_in_llamacpp_as_eval_measured_it(real_loaded, tmp_path, capsys):
    require_shared_data()
    plan, out = tmp_path / "q4_k.json", tmp_path / "q4_k.gguf"
    # (the imatrix path from plan to file is the search test's below)
    assert main(["plan", "--model", "smollm2-135m", "--gguf", "q4_k",
                 "--token-embedding-type", "q6_k", "--out", str(plan)]) == 0
    assert main(["export", str(plan), "--format", "gguf", "--out", str(out), "--json"]) == 0
    exported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # rows of 576 are not whole q4_k super-blocks: llama.cpp's fallback, as llama-quantize does
    assert exported["types"] == {"q4_k": 30, "q5_0": 180, "q8_0": 1, "f32": 61}
    common = ["eval", str(plan), "--eval-text", str(EVAL_TEXT), "--windows", "1",
              "--window-len", "512", "--no-kl", "--json"]
    assert main(common) == 0
    torch_run = json.loads(capsys.readouterr().out)
    assert main(common + ["--engine", "llamacpp", "--gguf", str(out)]) == 0
    llama_run = json.loads(capsys.readouterr().out)
    assert llama_run["ppl"] == pytest.approx(torch_run["ppl"], rel=0.02)
    # the plan's accounting is the file's tensors: only metadata and alignment come on top
    assert 0 < exported["file_bytes"] - torch_run["weight_bytes"] < 3_000_000


def test_a_gguf_search_ends_with_the_file_llamacpp_confirms(real_loaded, tmp_path, capsys):
    """`search` over GGUF types writes model.gguf beside plan.json and measures it in
    llama.cpp on the held-out windows it measured the plan on in torch."""
    require_shared_data()
    from ..conftest import CALIB_TEXT

    space = tmp_path / "gguf2.yaml"
    space.write_text("defaults: {method: imatrix}\noptions: [{gguf: q4_0}, {gguf: q8_0}]\n"
                     "tables: {model.embed_tokens: {gguf: q8_0}}\n")
    out = tmp_path / "search"
    assert main(["search", "--space", str(space), "--budget", "150MB", "--context", "512",
                 "--trials", "2", "--eval-top", "0", "--holdout-windows", "1",
                 "--calib-windows", "2", "--window-len", "128", "--calib-text", str(CALIB_TEXT),
                 "--mode", "parallel", "--out", str(out)]) == 0
    plan = json.loads((out / "plan.json").read_text())
    check = plan["figures"]["llamacpp"]
    assert (out / "model.gguf").stat().st_size == check["file_bytes"]
    assert check["types"]["q8_0"] >= 1 and set(check["types"]) <= {"q4_0", "q8_0", "f32"}
    torch_kl = plan["figures"]["holdout"]["reported"]["kl"]
    assert check["windows"] == plan["figures"]["holdout"]["windows"] == 1
    # the same weights in another engine: llama.cpp's kernels add about 0.003-0.005 of KL
    # on SmolLM2 (its float16 file against torch float32: 0.0033)
    assert abs(check["kl"] - torch_kl) < 0.01 + 0.3 * torch_kl
    # `eval --engine llamacpp` finds the search's file and measures the same figure again
    capsys.readouterr()
    assert main(["eval", str(out / "plan.json"), "--engine", "llamacpp", "--holdout",
                 "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["gguf"].endswith("model.gguf") and again["windows"] == 1
    assert again["kl"] == pytest.approx(check["kl"], rel=1e-5)
