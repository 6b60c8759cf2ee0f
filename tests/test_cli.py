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
    (["search", "--budget", "4GB", "--space", "gguf", "--recover", "kd"], "a GGUF space has none"),
    (["search", "--budget", "4GB", "--recover", "kd", "--kd-lr", "2"], "learning rate"),
    (["search", "--budget", "4GB", "--space", "gguf", "--rounding", "signround"],
     "needs a native space"),
    (["search", "--budget", "4GB", "--mode", "parallel", "--rounding", "signround"],
     "--mode sequential"),
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
    assert 50e6 < record["peak_rss_bytes"] < 64 * 2**30  # torch alone is more than 50 MB

    # on a device: the memory by part against what it allows, and the predicted speed
    assert main(["eval", str(plan_path), "--windows", "2", "--window-len", "64", "--json",
                 "--no-kl", "--device", "jetson-orin-nano-4gb", "--context", "256"]) == 0
    device = json.loads(capsys.readouterr().out)["device"]
    assert device["device"] == "jetson-orin-nano-4gb" and device["fits"]
    assert device["memory"]["layer_weights"] == record["layer_weight_bytes"]
    assert device["decode"]["tokens_per_s"] > 0


def test_apply_and_eval_build_a_gptq_plan_as_its_provenance_records(tiny_model_dir, tmp_path,
                                                                     capsys):
    """`plan` records how GPTQ will be calibrated; apply and eval reproduce it and say so, and a
    flag that departs from it is said too. The built weights follow the record: the parallel
    plan's apply equals compress_model in parallel mode, not the sequential default."""
    from safetensors.torch import load_file

    from autocompress.compress.apply import compress_model
    from autocompress.model import load_model
    from autocompress.provenance import calibration_windows
    from autocompress.plan import Plan

    plan_path = tmp_path / "gptq.json"
    assert main(["plan", "--model", str(tiny_model_dir), "--bits", "3", "--method", "gptq",
                 "--mode", "parallel", "--calib-windows", "2", "--window-len", "64",
                 "--out", str(plan_path)]) == 0
    assert "embedded pydoc corpus" in capsys.readouterr().err  # prose calibrates better
    plan = Plan.load(plan_path)
    assert (plan.provenance.mode, plan.provenance.calib_windows) == ("parallel", 2)

    assert main(["apply", str(plan_path), "--out", str(tmp_path / "c")]) == 0
    assert "reproducing the plan's provenance: parallel calibration on 2 windows of 64" in \
        capsys.readouterr().err
    loaded = load_model(str(tiny_model_dir))
    calib = calibration_windows(loaded.tokenizer, plan.provenance)
    name = "model.layers.1.mlp.down_proj"
    written = load_file(str(tmp_path / "c" / "model.safetensors"))[f"{name}.weight"].float()
    for mode, same in (("parallel", True), ("sequential", False)):
        built = compress_model(loaded, plan, calib, mode=mode, progress=False)
        weight = built.get_submodule(name).weight.detach().half().float()
        assert torch.equal(written, weight) == same
    assert json.loads((tmp_path / "c" / "plan.json").read_text())["provenance"]["mode"] == \
        "parallel"

    assert main(["eval", str(plan_path), "--windows", "2", "--window-len", "64", "--json",
                 "--mode", "sequential"]) == 0
    captured = capsys.readouterr()
    assert "overriding the plan's provenance (mode sequential)" in captured.err
    assert json.loads(captured.out)["provenance"]["mode"] == "sequential"


def test_a_v1_plan_still_applies_the_old_default_way(tiny_model_dir, tmp_path, capsys):
    plan_path = tmp_path / "plan.json"
    assert main(["plan", "--model", str(tiny_model_dir), "--bits", "4", "--method", "gptq",
                 "--out", str(plan_path)]) == 0
    data = json.loads(plan_path.read_text())
    data["schema_version"] = 1
    del data["provenance"]
    plan_path.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["eval", str(plan_path), "--windows", "1", "--window-len", "64", "--no-kl",
                 "--calib-windows", "2", "--json"]) == 0
    captured = capsys.readouterr()
    assert "records no provenance (schema v1)" in captured.err
    assert json.loads(captured.out)["provenance"]["mode"] == "sequential"


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


def test_search_defaults_to_the_joint_space(tiny_model_dir, tmp_path, capsys):
    """Without --space, search chooses among the joint space's options (GPTQ, sparsity, low
    rank), not bits-only RTN, and says that GPTQ/Wanda calibrate on the embedded corpus."""
    import yaml

    from autocompress.search.space import spaces_dir

    out = tmp_path / "run"
    assert main(["search", "--model", str(tiny_model_dir), "--budget", "10MB", "--out", str(out),
                 "--calib-windows", "2", "--window-len", "64", "--context", "256",
                 "--holdout-windows", "1", "--trials", "0", "--eval-top", "0"]) == 0
    assert "embedded pydoc corpus" in capsys.readouterr().err
    table = json.loads((out / "sensitivity.json").read_text())
    offered = {json.dumps(o, sort_keys=True) for row in table["options"] for o in row}
    joint = yaml.safe_load((spaces_dir() / "joint.yaml").read_text())["options"]
    assert len(offered) >= len(joint) - 2  # tied groups may drop an option or two
    assert any('"method": "gptq"' in o for o in offered)
    assert any('"2:4"' in o for o in offered) and any('"rank_ratio": 0.5' in o for o in offered)
    assert main(["search", "--model", str(tiny_model_dir), "--budget", "10MB", "--out",
                 str(tmp_path / "b"), "--bits", "2,4", "--space", "joint"]) == 2
    assert "not both" in capsys.readouterr().err


def test_plan_recipe_writes_llama_cpps_types_as_a_plan(tiny_model_dir, tmp_path):
    """`plan --recipe Q4_K_M --imatrix`: every block linear and the embedding get the type
    llama-quantize would give them (the tiny model's 64-wide rows take the fallbacks), the
    weighting is recorded per layer, and the calibration windows are in the provenance."""
    pytest.importorskip("xllamacpp", reason="llama.cpp (pip install 'autocompress[llamacpp]')")
    from autocompress.gguf_recipes import recipe_configs
    from autocompress.plan import Plan
    from autocompress.model import load_model

    out = tmp_path / "recipe.json"
    assert main(["plan", "--model", str(tiny_model_dir), "--recipe", "q4_k_m", "--imatrix",
                 "--calib-windows", "2", "--window-len", "64", "--out", str(out)]) == 0
    plan = Plan.load(out)
    loaded = load_model(str(tiny_model_dir))
    assert plan.resolve_model(loaded) == recipe_configs(loaded, "Q4_K_M", imatrix=True)
    assert plan.figures["label"] == "llama.cpp Q4_K_M imatrix"
    assert plan.provenance.calib_digest is not None


def test_dtype_is_chosen_recorded_and_reproduced(tiny_model_dir, tmp_path, capsys):
    """`--dtype bfloat16` computes in bfloat16 (another perplexity than float32's, close to
    it); a plan that records bfloat16 is evaluated in bfloat16 again with `--dtype auto`, and
    the table a bfloat16 sensitivity run writes is not reused for float32."""
    from autocompress.plan import Plan

    plan_path = tmp_path / "plan.json"
    assert main(["plan", "--model", str(tiny_model_dir), "--bits", "4", "--out",
                 str(plan_path)]) == 0
    common = ["--windows", "2", "--window-len", "64", "--json", "--no-kl"]
    capsys.readouterr()
    results = {}
    for dtype in ("auto", "bfloat16"):
        assert main(["eval", str(plan_path), "--dtype", dtype, *common]) == 0
        captured = capsys.readouterr()
        results[dtype] = json.loads(captured.out)
    assert results["auto"]["compute"] == "cpu, float32"
    assert results["bfloat16"]["compute"] == "cpu, bfloat16"
    assert results["bfloat16"]["provenance"]["compute_dtype"] == "bfloat16"
    assert "computing in bfloat16, not the plan's float32" in captured.err
    ratio = results["bfloat16"]["ppl"] / results["auto"]["ppl"]
    assert ratio != 1.0 and abs(ratio - 1) < 0.05

    plan = Plan.load(plan_path)
    import dataclasses

    bf16_plan = dataclasses.replace(plan, provenance=dataclasses.replace(
        plan.provenance, compute_dtype="bfloat16"))
    bf16_plan.save(tmp_path / "bf16.json")
    assert main(["eval", str(tmp_path / "bf16.json"), *common]) == 0
    captured = capsys.readouterr()
    again = json.loads(captured.out)
    assert again["compute"] == "cpu, bfloat16" and again["ppl"] == results["bfloat16"]["ppl"]
    assert "computing on cpu, bfloat16" in captured.err

    table = tmp_path / "table.json"
    args = ["sensitivity", "--model", str(tiny_model_dir), "--space", "bits",
            "--calib-windows", "2", "--window-len", "32", "--out", str(table)]
    assert main(args + ["--dtype", "bfloat16"]) == 0
    bf16_key = json.loads(table.read_text())["meta"]["key"]
    assert bf16_key["dtype"] == "bfloat16"
    assert main(args) == 0
    f32_key = json.loads(table.read_text())["meta"]["key"]
    assert "dtype" not in f32_key  # caches written before the option stay valid
    assert f32_key["weights"] != bf16_key["weights"]  # bfloat16 weights are other weights
