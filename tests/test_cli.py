"""The CLI: bad input gets one clear line and exit code 2; the verbs chain plan -> apply/eval."""

import json

import pytest
import torch

from autocompress.cli import main

from .conftest import make_tiny_model_dir


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:"), err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("argv, expected", [
    (["search", "--budget", "4 bananas"], "4 bananas"),
    (["search", "--budget", "4GB", "--model", "no-such-model"], "unknown model"),
    (["search", "--budget", "1KB"], "no plan fits"),
])
def test_search_bad_input(tiny_model_dir, tmp_path, capsys, argv, expected):
    argv = argv + ["--out", str(tmp_path / "out")]
    if "--model" not in argv:
        argv += ["--model", str(tiny_model_dir)]
    assert main(argv) == 2
    assert expected in _error_line(capsys)
    assert not (tmp_path / "out" / "plan.json").exists()


def test_plan_apply_eval_chain(tiny_model_dir, tmp_path, capsys):
    plan_path = tmp_path / "plan.json"
    assert main(["plan", "--model", str(tiny_model_dir), "--bits", "4", "--out", str(plan_path)]) == 0
    plan = json.loads(plan_path.read_text())
    assert plan["default"]["bits"] == 4 and plan["model"]["source"] == str(tiny_model_dir)

    assert main(["apply", str(plan_path), "--out", str(tmp_path / "compressed")]) == 0
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "compressed")
    q = reloaded.model.layers[0].self_attn.q_proj.weight
    assert len(torch.unique(q[0, :64])) <= 16  # one 4-bit group: at most 16 levels
    assert (tmp_path / "compressed" / "plan.json").is_file()

    capsys.readouterr()
    assert main(["eval", str(plan_path), "--windows", "2", "--window-len", "64", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert {"ppl", "kl", "weight_bytes", "total_bytes"} <= set(record)
    assert record["kl"] > 0 and record["ppl"] > 1


def test_eval_missing_text_and_wrong_model(tiny_model_dir, tmp_path, capsys):
    plan_path = tmp_path / "plan.json"
    assert main(["plan", "--model", str(tiny_model_dir), "--bits", "4", "--out", str(plan_path)]) == 0
    capsys.readouterr()
    assert main(["eval", str(plan_path), "--eval-text", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in _error_line(capsys)

    other = make_tiny_model_dir(tmp_path / "three-blocks", n_layers=3)
    assert main(["eval", str(plan_path), "--model", str(other)]) == 2
    line = _error_line(capsys)
    assert "plan was made for" in line and "model.layers.2" in line

    assert main(["eval", str(tmp_path / "nope.json")]) == 2
    assert "not found" in _error_line(capsys)


def test_apply_packed_matches_accounting(tiny_model_dir, tmp_path, capsys):
    from autocompress.model import load_model
    from autocompress.plan import Plan
    from autocompress.runtime.convert import load_packed

    plan_path = tmp_path / "plan.json"
    assert main(["plan", "--model", str(tiny_model_dir), "--bits", "3", "--out", str(plan_path)]) == 0
    assert main(["apply", str(plan_path), "--packed", "--out", str(tmp_path / "packed")]) == 0
    assert "plan accounting" in capsys.readouterr().err
    packed = load_packed(tmp_path / "packed")
    loaded = load_model(str(tiny_model_dir))
    from autocompress.compress.apply import compress_model

    reference = compress_model(loaded, Plan.load(plan_path), progress=False)
    x = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        got = packed.model(x).logits
        assert torch.allclose(got, reference(x).logits, atol=2e-2, rtol=1e-2)
