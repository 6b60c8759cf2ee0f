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
    (["search", "--budget", "4GB", "--device", "jetsn"], "unknown device 'jetsn'"),
    (["search", "--budget", "4GB", "--min-tps", "20"], "need --device"),
    (["search", "--device", "jetson", "--latency", "fast"], "cannot read duration 'fast'"),
    (["search"], "give --budget"),
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

    # on a device: the memory by part against what it allows, and the predicted speed
    assert main(["eval", str(plan_path), "--windows", "2", "--window-len", "64", "--json",
                 "--no-kl", "--device", "jetson-orin-nano-4gb", "--context", "256"]) == 0
    device = json.loads(capsys.readouterr().out)["device"]
    assert device["device"] == "jetson-orin-nano-4gb" and device["fits"]
    assert device["memory"]["layer_weights"] == record["layer_weight_bytes"]
    assert device["decode"]["tokens_per_s"] > 0


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


# -- hardware verbs ----------------------------------------------------------------------------

def test_devices_lists_every_profile(capsys):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    assert "jetson-orin-nano-8gb" in out and "--device jetson means jetson-orin-nano-8gb" in out


def test_estimate_a_plan_from_a_config_alone(tmp_path, capsys):
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "llama-2-7b.json"
    plan_path = tmp_path / "q4.json"
    assert main(["plan", "--config", str(config), "--bits", "4", "--group-size", "32",
                 "--out", str(plan_path)]) == 0
    capsys.readouterr()
    assert main(["estimate", str(plan_path), "--device", "jetson-agx-orin-64gb", "--json",
                 "--context", "512"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["fits"] and record["decode"]["context"] == 512
    assert 20 < record["decode"]["tokens_per_s"] < 80
    # the same plan on the 4 GB Orin Nano does not fit, and says so without failing
    assert main(["estimate", str(plan_path), "--device", "jetson-orin-nano-4gb", "--json"]) == 0
    assert not json.loads(capsys.readouterr().out)["fits"]


def test_estimate_refuses_a_plan_for_another_model(tiny_model_dir, tmp_path, capsys):
    from pathlib import Path

    plan_path = tmp_path / "tiny.json"
    assert main(["plan", "--model", str(tiny_model_dir), "--bits", "4", "--out", str(plan_path)]) == 0
    capsys.readouterr()
    config = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "llama-2-7b.json"
    assert main(["estimate", str(plan_path), "--device", "jetson", "--config", str(config)]) == 2
    assert "plan was made for model" in _error_line(capsys).replace("--device jetson means", "")


def test_profile_writes_a_loadable_profile_and_bad_profiles_exit_2(tiny_model_dir, tmp_path,
                                                                   capsys):
    out = tmp_path / "box.yaml"
    assert main(["profile", "--out", str(out), "--model", str(tiny_model_dir),
                 "--formats", "q5+2:4,q7"]) == 2
    assert "unknown format 'q7'" in _error_line(capsys)
    assert main(["profile", "--out", str(out), "--model", str(tiny_model_dir),
                 "--formats", "f16,q4"]) == 0
    assert "wrote" in capsys.readouterr().err
    plan_path = tmp_path / "plan.json"
    assert main(["plan", "--model", str(tiny_model_dir), "--bits", "4", "--out", str(plan_path)]) == 0
    capsys.readouterr()
    assert main(["estimate", str(plan_path), "--device", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["device"] == "box" and record["decode"]["sources"] == {"lookup": 14}

    out.write_text(out.read_text().replace("bandwidth_gbps:", "bandwidth_gbps: -1 #"))
    assert main(["estimate", str(plan_path), "--device", str(out)]) == 2
    assert "memory.bandwidth_gbps" in _error_line(capsys)
