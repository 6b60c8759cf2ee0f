"""Bad input, command by command: one line saying what is wrong, exit code 2, no traceback, and
nothing already written is lost.

Each row is (command line, expected exit code, words the line must hold). ``{x}`` in the
command line is a file of the ``inputs`` fixture below (valid where a row needs something
valid beside the bad part); ``{model}`` is the tiny model and ``{tmp}`` a fresh directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from autocompress.cli import main

def _bundled_profile() -> str:
    from autocompress.hardware.profile import profiles_dir

    return (profiles_dir() / "raspberry-pi-5-8gb.yaml").read_text()


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tmp_path_factory):
    """Every file a row names, made once: good ones to combine with one bad part, bad ones."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("bad-inputs")
    f = {"model": str(tiny_model_dir)}
    plan = root / "plan.json"
    assert main(["plan", "--model", str(tiny_model_dir), "--bits", "4", "--out", str(plan)]) == 0
    f["plan"] = plan
    f["plan_gguf"] = root / "plan_gguf.json"
    assert main(["plan", "--model", str(tiny_model_dir), "--gguf", "q8_0",
                 "--out", str(f["plan_gguf"])]) == 0
    good = json.loads(plan.read_text())
    layer = next(iter(good["model"]["layers"]))

    def plan_with(name, **changes):
        data = json.loads(json.dumps(good))
        for key, value in changes.items():
            data[key] = value
        return _write(root / f"{name}.json", json.dumps(data))

    f["plan_unknown_key"] = plan_with("unknown_key", colour="blue")
    f["plan_regex_idle"] = plan_with("regex_idle", overrides={"re:.*\\.mlp\\.gate": {"bits": 8}})
    f["plan_exact_idle"] = plan_with("exact_idle", overrides={"model.layers.9.mlp.up_proj":
                                                              {"bits": 8}})
    f["plan_bad_value"] = plan_with("bad_value", overrides={layer: {"bits": 7}})
    f["plan_bad_sparsity"] = plan_with("bad_sparsity", overrides={layer: {"sparsity": "lots"}})
    f["plan_bad_default"] = plan_with("bad_default", default={**good["default"],
                                                              "group_size": 48})
    f["plan_overrides_list"] = plan_with("overrides_list", overrides=[1, 2])
    f["plan_embed_imatrix"] = plan_with("embed_imatrix", overrides={
        "model.embed_tokens": {"gguf": "q4_k", "method": "imatrix"}})
    f["plan_embed_native"] = plan_with("embed_native", overrides={"model.embed_tokens": {"bits": 4}})
    f["plan_tied_head"] = plan_with("tied_head", overrides={"lm_head": {"gguf": "q6_k"}})
    other = json.loads(json.dumps(good))
    other["model"]["content_hash"] = "0" * 16
    other["model"]["layers"] = {k: [v[0], v[1] * 2] for k, v in other["model"]["layers"].items()}
    f["plan_other_model"] = _write(root / "other_model.json", json.dumps(other))
    f["plan_version"] = plan_with("version", schema_version=9)
    f["plan_no_provenance"] = _write(root / "no_prov.json", json.dumps(
        {k: v for k, v in good.items() if k != "provenance"}))
    f["plan_bad_provenance"] = plan_with("bad_prov", provenance={**good["provenance"],
                                                                 "mode": "sideways"})
    f["not_json"] = _write(root / "not.json", "{ this is not json")
    f["binary"] = _write(root / "binary.bin", bytes(range(256)) * 8)
    f["empty_text"] = _write(root / "empty.txt", "   \n")
    f["text"] = _write(root / "text.txt", "Some words of text.\n" * 50)
    f["gptq_plan"] = root / "gptq.json"
    assert main(["plan", "--model", str(tiny_model_dir), "--bits", "4", "--method", "gptq",
                 "--calib-text", str(f["text"]), "--calib-windows", "2", "--window-len", "32",
                 "--out", str(f["gptq_plan"])]) == 0
    moved = _write(root / "moved.txt", "Some words of text.\n" * 50)
    f["gptq_plan_moved_text"] = root / "gptq_moved.json"
    assert main(["plan", "--model", str(tiny_model_dir), "--bits", "4", "--method", "gptq",
                 "--calib-text", str(moved), "--calib-windows", "2", "--window-len", "32",
                 "--out", str(f["gptq_plan_moved_text"])]) == 0
    moved.unlink()

    # models
    f["no_config_dir"] = _write(root / "no_config" / "weights.bin", b"x").parent
    broken = root / "missing_weight"
    shutil.copytree(tiny_model_dir, broken)
    state = load_file(str(tiny_model_dir / "model.safetensors"))
    state.pop(f"{layer}.weight")
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    f["missing_weight"] = broken
    reshaped = root / "reshaped"
    shutil.copytree(tiny_model_dir, reshaped)
    state = load_file(str(tiny_model_dir / "model.safetensors"))
    state[f"{layer}.weight"] = state[f"{layer}.weight"][:, :8].contiguous()
    save_file(state, str(reshaped / "model.safetensors"), metadata={"format": "pt"})
    f["reshaped"] = reshaped
    truncated = root / "truncated"
    shutil.copytree(tiny_model_dir, truncated)
    data = (tiny_model_dir / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    f["truncated"] = truncated
    scaled = root / "rope-scaled"  # llama 3's RoPE scaling: no GGUF export from a directory
    shutil.copytree(tiny_model_dir, scaled)
    config = json.loads((scaled / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 128,
                              "rope_theta": 10000.0}
    config.pop("rope_parameters", None)
    (scaled / "config.json").write_text(json.dumps(config))
    f["rope_scaled"] = scaled
    f["plan_gguf_scaled"] = root / "plan_gguf_scaled.json"
    assert main(["plan", "--model", str(scaled), "--gguf", "q8_0",
                 "--out", str(f["plan_gguf_scaled"])]) == 0
    f["packed"] = root / "packed"
    assert main(["apply", str(plan), "--model", str(tiny_model_dir), "--packed",
                 "--out", str(f["packed"])]) == 0
    f["gguf_truncated"] = _write(root / "truncated.gguf", b"GGUF\x03\x00\x00\x00" + b"\x07" * 40)
    f["gguf_empty"] = _write(root / "empty.gguf", b"")

    # outputs
    f["user_dir"] = _write(root / "user_dir" / "notes.txt", "my notes").parent
    f["a_file"] = _write(root / "a_file.txt", "mine")
    f["search_done"] = root / "search_done"  # what a finished search leaves
    _write(f["search_done"] / ".autocompress.json",
           json.dumps({"command": "search", "entries": ["plan.json", "search.json"]}))
    _write(f["search_done"] / "plan.json", plan.read_text())

    # spaces
    f["space_bad_yaml"] = _write(root / "bad_yaml.yaml", "options: [bits: 4\n")
    f["space_unknown_key"] = _write(root / "unknown_key.yaml", "options: [{bits: 4}]\ncolour: 1\n")
    f["space_tied_kind"] = _write(root / "tied.yaml", "options: [{bits: 4}]\ntied: [[q, kk]]\n")
    f["space_tied_shape"] = _write(root / "tied2.yaml", "options: [{bits: 4}]\ntied: q\n")
    f["space_nan"] = _write(root / "nan.yaml", "options: [{bits: 4, sparsity: .nan}]\n")
    f["space_bad_field"] = _write(root / "field.yaml", "options: [{bitz: 4}]\n")
    f["space_kinds_kind"] = _write(root / "kinds.yaml",
                                   "options: [{bits: 4}]\nkinds: {mlp: [{bits: 8}]}\n")
    f["space_tables_name"] = _write(root / "tables.yaml", "options: [{bits: 4}]\n"
                                    "tables: {model.embed: {gguf: q8_0}}\n")
    f["space_tables_native"] = _write(root / "tables2.yaml", "options: [{bits: 4}]\n"
                                      "tables: {model.embed_tokens: {bits: 4}}\n")
    f["space_tables_head"] = _write(root / "tables3.yaml", "options: [{gguf: q8_0}]\n"
                                    "tables: {lm_head: {gguf: q8_0}}\n")
    f["space_binary"] = _write(root / "binary.yaml", bytes(range(128, 256)) * 4)

    # profiles
    profile = _bundled_profile()
    for old, new, name in (("bandwidth_gbps: 17.1", "bandwidth_gbps: .nan", "profile_nan"),
                           ("f32: 0.154", "f32: .inf", "profile_inf"),
                           ("fallback:\n  efficiency: 0.2\n", "", "profile_missing"),
                           ("capacity: 8GiB", "capacity: lots", "profile_capacity")):
        assert old in profile
        f[name] = _write(root / f"{name}.yaml", profile.replace(old, new))
    f["profile_bad_yaml"] = _write(root / "bad_profile.yaml", "memory: {capacity: [\n")
    f["profile_binary"] = _write(root / "binary_profile.yaml", bytes(range(128, 256)) * 4)
    f["config_bad"] = _write(root / "config.json", "{ nope")
    return {k: str(v) for k, v in f.items()}


ROWS = [
    # -- layers ------------------------------------------------------------------------------
    ("layers --model no-such-model", 2, "unknown model"),
    ("layers --model {no_config_dir}", 2, "without config.json"),
    ("layers --model {missing_weight}", 2, "1 missing"),
    ("layers --model {reshaped}", 2, "wrong shape"),
    ("layers --model {truncated}", 2, "truncated or corrupt"),
    ("layers --model {packed}", 2, "packed model"),
    ("layers --model {gguf_truncated}", 2, "truncated or corrupt"),
    ("layers --model {gguf_empty}", 2, "truncated or corrupt"),
    ("layers --model {text}", 2, "unknown model"),
    ("layers --colour red", 2, "unrecognized arguments"),
    # -- where and in what precision (every command that computes) -----------------------------
    ("sensitivity --model {model} --compute-device gpu --out {tmp}/t.json", 2,
     "unknown compute device 'gpu'"),
    ("search --model {model} --budget 1MB --compute-device cuda:7 --out {tmp}/s", 2,
     "--compute-device cuda:7"),
    ("apply {plan} --compute-device tpu --out {tmp}/m", 2, "unknown compute device 'tpu'"),
    ("eval {plan} --dtype float8", 2, "invalid choice: 'float8'"),
    ("export {plan_gguf} --format gguf --compute-device cuda:7 --out {tmp}/m.gguf", 2,
     "--compute-device cuda:7"),
    ("nosuchcommand", 2, "invalid choice"),
    # -- plan --------------------------------------------------------------------------------
    ("plan --model {model} --bits 7 --out {tmp}/p.json", 2, "bits must be one of"),
    ("plan --model {model} --bits x --out {tmp}/p.json", 2, "invalid int value"),
    ("plan --model {model} --bits 4 --group-size 48 --out {tmp}/p.json", 2, "group_size"),
    ("plan --model {model} --bits 4 --group-size abc --out {tmp}/p.json", 2, "group size 'abc'"),
    ("plan --model {model} --bits 4 --sparsity 1.5 --out {tmp}/p.json", 2, "sparsity"),
    ("plan --model {model} --bits 4 --rank-ratio 0 --out {tmp}/p.json", 2, "rank_ratio"),
    ("plan --model {model} --bits 4 --pattern 2:4 --sparsity 0.3 --out {tmp}/p.json", 2, "2:4"),
    ("plan --model {model} --bits 4 --out {user_dir}", 2, "is a directory"),
    ("plan --model {model} --bits 4 --out {a_file}", 2, "not an autocompress plan"),
    ("plan --model {model} --bits 4 --out {a_file}/p.json", 2, "is a file, not a directory"),
    ("plan --config {config_bad} --bits 4 --out {config_bad}", 2, "is an input"),
    ("plan --config {tmp}/none.json --bits 4 --out {tmp}/p.json", 2, "No such file"),
    ("plan --config {config_bad} --bits 4 --out {tmp}/p.json", 2, "config"),
    ("plan --model {model} --bits 4 --method gptq --calib-text {tmp}/none.txt --out {tmp}/p.json",
     2, "not found"),
    ("plan --model {model} --bits 4 --method gptq --calib-text {binary} --out {tmp}/p.json",
     2, "not UTF-8"),
    ("plan --model {model} --bits 4 --method gptq --calib-text {empty_text} --out {tmp}/p.json",
     2, "is empty"),
    ("plan --model {model} --bits 4 --calib-windows 0 --out {tmp}/p.json", 2, "must be positive"),
    ("plan --model {model} --out {tmp}/p.json", 2, "--bits N (native) or --gguf TYPE"),
    ("plan --model {model} --bits 4 --gguf q4_k --out {tmp}/p.json", 2, "--bits N (native)"),
    ("plan --model {model} --gguf q7_k --out {tmp}/p.json", 2, "gguf must be one of"),
    ("plan --model {model} --gguf q4_k --method gptq --out {tmp}/p.json", 2, "own grid"),
    ("plan --model {model} --gguf q4_k --clip --out {tmp}/p.json", 2,
     "--clip and --awq apply to --bits"),
    ("plan --model {model} --gguf q4_k --awq --out {tmp}/p.json", 2,
     "--clip and --awq apply to --bits"),
    ("plan --model {model} --bits 3 --awq --sparsity 0.5 --out {tmp}/p.json", 2,
     "awq scales the input columns of dense"),
    ("plan --model {model} --bits 3 --method signround --rank-ratio 0.5 --out {tmp}/p.json", 2,
     "signround learns the rounding of dense"),
    ("plan --model {model} --recipe Q4_K_M --clip --out {tmp}/p.json", 2, "leave out"),
    ("plan --model {model} --gguf q4_k --sparsity 0.5 --out {tmp}/p.json", 2, "dense, full-rank"),
    ("plan --model {model} --bits 4 --imatrix --out {tmp}/p.json", 2, "--imatrix goes with"),
    ("plan --model {model} --bits 4 --token-embedding-type q9 --out {tmp}/p.json", 2,
     "gguf must be one of"),
    ("plan --model {model} --gguf q8_0 --output-tensor-type q6_k --out {tmp}/p.json", 2,
     "tied to its token embedding"),
    ("plan --model {model} --recipe Q4_K_X --out {tmp}/p.json", 2, "unknown llama.cpp recipe"),
    ("plan --model {model} --recipe Q4_K_M --bits 4 --out {tmp}/p.json", 2, "leave out --bits"),
    ("plan --model {model} --bits 4 --pure --out {tmp}/p.json", 2, "--pure goes with"),
    ("export {plan} --model {model} --format gguf --out {tmp}/m.gguf", 2, "no GGUF type"),
    ("export {plan_gguf_scaled} --model {rope_scaled} --format gguf --out {tmp}/m.gguf", 2,
     "uses RoPE scaling 'llama3'"),
    ("export {plan_gguf} --model {model} --format gguf --out {a_file}", 2,
     "not an autocompress GGUF export"),
    ("export {plan_gguf} --model {model} --format gguf --out {plan_gguf}", 2, "is an input"),
    ("export {plan_gguf} --model {model} --format onnx --out {tmp}/m.gguf", 2, "invalid choice"),
    ("export {plan_embed_imatrix} --model {model} --format gguf --out {tmp}/m.gguf", 2,
     "without an importance matrix"),
    ("apply {plan_embed_native} --model {model} --out {tmp}/o", 2, "take a gguf type"),
    ("apply {plan_tied_head} --model {model} --out {tmp}/o", 2, "give the format to"),
    ("apply {plan_gguf} --model {model} --packed --out {tmp}/o", 2, "export PLAN --format gguf"),
    # -- apply -------------------------------------------------------------------------------
    ("apply {tmp}/none.json --model {model} --out {tmp}/o", 2, "not found"),
    ("apply {not_json} --model {model} --out {tmp}/o", 2, "not valid JSON"),
    ("apply {binary} --model {model} --out {tmp}/o", 2, "not valid JSON"),
    ("apply {plan_unknown_key} --model {model} --out {tmp}/o", 2, "unknown top-level key"),
    ("apply {plan_regex_idle} --model {model} --out {tmp}/o", 2, "match no layer"),
    ("apply {plan_exact_idle} --model {model} --out {tmp}/o", 2, "unknown layer"),
    ("apply {plan_bad_value} --model {model} --out {tmp}/o", 2, "model.layers.0"),
    ("apply {plan_bad_sparsity} --model {model} --out {tmp}/o", 2, "sparsity must be a number"),
    ("apply {plan_bad_default} --model {model} --out {tmp}/o", 2, "plan default: group_size"),
    ("apply {plan_overrides_list} --model {model} --out {tmp}/o", 2, "overrides must be an object"),
    ("apply {plan_other_model} --model {model} --out {tmp}/o", 2, "different shape"),
    ("apply {plan_version} --model {model} --out {tmp}/o", 2, "schema_version 9"),
    ("apply {plan_no_provenance} --model {model} --out {tmp}/o", 2, "needs its provenance"),
    ("apply {plan_bad_provenance} --model {model} --out {tmp}/o", 2, "sideways"),
    ("apply {plan} --model {model} --out {user_dir}", 2, "did not write (notes.txt)"),
    ("apply {plan} --model {model} --out {model}", 2, "is an input"),
    ("apply {plan} --model {model} --out {a_file}", 2, "is a file"),
    ("apply {plan} --model {model} --out {a_file}/o", 2, "is a file, not a directory"),
    ("apply {plan} --model {packed} --out {tmp}/o", 2, "packed model"),
    ("apply {plan} --model {missing_weight} --out {tmp}/o", 2, "random values"),
    ("apply {gptq_plan_moved_text} --model {model} --out {tmp}/o", 2, "moved.txt"),
    ("apply {gptq_plan} --model {model} --calib-text {tmp}/none.txt --out {tmp}/o", 2,
     "not found"),
    ("apply {plan} --model {model} --mode sideways --out {tmp}/o", 2, "invalid choice"),
    # -- eval --------------------------------------------------------------------------------
    ("eval {plan} --model {model} --eval-text {tmp}/none.txt", 2, "not found"),
    ("eval {plan} --model {model} --eval-text {binary}", 2, "not UTF-8"),
    ("eval {plan} --model {model} --eval-text {empty_text}", 2, "is empty"),
    ("eval {plan} --model {model} --device jetsn", 2, "unknown device 'jetsn'"),
    ("eval {plan} --model {model} --device {profile_nan}", 2, "bandwidth_gbps"),
    ("eval {plan} --model {model} --holdout", 2, "held-out"),
    ("eval {plan} --model {model} --holdout --windows 2", 2, "leave out"),
    ("eval {plan} --model {model} --windows 0", 2, "must be positive"),
    ("eval {plan} --model {model} --eval-text {text} --windows 500", 2, "windows"),
    ("eval {plan_other_model} --model {model}", 2, "not 'tiny"),
    ("eval {plan} --model {model} --engine llamacpp", 2, "give --gguf FILE"),
    ("eval {plan} --model {model} --engine llamacpp --gguf {tmp}/none.gguf", 2, "not found"),
    ("eval {plan} --model {model} --gguf {gguf_truncated}", 2, "for --engine llamacpp"),
    ("eval {plan} --model {model} --engine llamacpp --gguf {gguf_truncated}", 2,
     "truncated or corrupt"),
    ("eval {plan} --model {model} --engine onnx", 2, "invalid choice"),
    # -- sensitivity -------------------------------------------------------------------------
    ("sensitivity --model {model} --proxy nope --out {tmp}/t.json", 2, "unknown proxy"),
    ("sensitivity --model {model} --space nope --out {tmp}/t.json", 2, "unknown search space"),
    ("sensitivity --model {model} --space {space_bad_yaml} --out {tmp}/t.json", 2, "not valid YAML"),
    ("sensitivity --model {model} --space {space_unknown_key} --out {tmp}/t.json", 2, "unknown keys"),
    ("sensitivity --model {model} --space {space_tied_kind} --out {tmp}/t.json", 2, "'kk'"),
    ("sensitivity --model {model} --space {space_tied_shape} --out {tmp}/t.json", 2, "list of lists"),
    ("sensitivity --model {model} --space {space_nan} --out {tmp}/t.json", 2, "sparsity"),
    ("sensitivity --model {model} --space {space_bad_field} --out {tmp}/t.json", 2, "bitz"),
    ("sensitivity --model {model} --space {space_kinds_kind} --out {tmp}/t.json", 2, "'mlp'"),
    ("sensitivity --model {model} --space {space_binary} --out {tmp}/t.json", 2, "not a text"),
    ("sensitivity --model {model} --space {space_tables_name} --out {tmp}/t.json", 2,
     "tables names 'model.embed'"),
    ("sensitivity --model {model} --space {space_tables_native} --out {tmp}/t.json", 2,
     "tables 'model.embed_tokens': the embedding and head take a gguf type"),
    ("sensitivity --model {model} --out {tmp}/t.png", 2, "like table.json"),
    ("sensitivity --model {model} --out {user_dir}", 2, "is a directory"),
    ("sensitivity --model {model} --calib-text {text} --out {text}", 2, "is an input"),
    ("sensitivity --model {model} --out {a_file}", 2, "not an autocompress sensitivity table"),
    # -- search ------------------------------------------------------------------------------
    ("search --model {model} --budget '4 bananas' --out {tmp}/s", 2, "4 bananas"),
    ("search --model {rope_scaled} --budget 1MB --space gguf --out {tmp}/s", 2,
     "convert_hf_to_gguf.py"),
    ("search --model {model} --budget 1MB --space {space_tables_head} --export none "
     "--out {tmp}/s", 2, "tied to its embedding"),
    ("search --model {model} --budget 1MB --export pdf --out {tmp}/s", 2, "invalid choice"),
    ("search --model {model} --budget 1KB --out {tmp}/s", 2, "no plan fits"),
    ("search --model {model} --budget 1KB --space gguf --out {tmp}/s", 2,
     "model.embed_tokens q8_0, fixed by the space"),
    ("search --model {model} --budget 4GB --device jetsn --out {tmp}/s", 2, "unknown device"),
    ("study fronts --model {model} --devices jetson-orin-nano-8gb,jetsn --out {tmp}/s", 2,
     "unknown device"),
    ("study fronts --model {model} --devices rtx-4090 --out {tmp}/s", 2, "at least two"),
    ("study fronts --model {model} --out {tmp}/s", 2, "at least two"),
    ("study fronts --model {model} --devices rtx-4090,raspberry-pi-5-8gb --min-tps "
     "rtx-4090:50 --out {tmp}/s", 2, "is not DEVICE=TOKENS_PER_S"),
    ("study fronts --model {model} --devices rtx-4090,raspberry-pi-5-8gb --min-tps "
     "jetson-orin-nano-8gb=50 --out {tmp}/s", 2, "not among --devices"),
    ("study families --model {model} --bits 3,four --out {tmp}/s", 2, "bits per weight"),
    ("study families --model {model} --families quantisation --out {tmp}/s", 2, "choose from"),
    # a cluster nothing answers on: said in seconds, before the table (Ray would retry for
    # many minutes)
    ("search --model {model} --budget 4GB --address 127.0.0.1:9 --out {tmp}/s", 2,
     "nothing answers at 127.0.0.1:9"),
    ("search --model {model} --budget 4GB --address headnode --out {tmp}/s", 2,
     "is not HOST:PORT"),
    ("search --model {model} --budget 4GB --device {profile_binary} --out {tmp}/s", 2,
     "not a text"),
    ("search --model {model} --budget 4GB --min-tps 20 --out {tmp}/s", 2, "need --device"),
    ("search --model {model} --budget 4GB --speed-profile {tmp}/none.yaml --min-tps 20 "
     "--out {tmp}/s", 2, "speed profile '"),
    ("search --model {model} --budget 4GB --speed-profile {a_file} --min-tps 20 "
     "--out {tmp}/s", 2, "not a llama.cpp speed profile"),
    ("search --model {model} --device jetson --latency fast --out {tmp}/s", 2, "'fast'"),
    ("search --model {model} --out {tmp}/s", 2, "give --budget"),
    ("search --model {model} --budget 4GB --bits 2,4 --space joint --out {tmp}/s", 2,
     "not both"),
    ("search --model {model} --budget 4GB --bits 7 --out {tmp}/s", 2, "not supported"),
    ("search --model {model} --budget 4GB --bits two --out {tmp}/s", 2, "comma list"),
    ("search --model {model} --budget 4GB --storage foo://x --out {tmp}/s", 2,
     "cannot be opened"),
    ("search --model {model} --budget 4GB --storage {tmp}/no/dir/j --out {tmp}/s", 2,
     "existing directory"),
    ("search --model {model} --budget 4GB --out {user_dir}", 2, "did not write"),
    ("search --model {model} --budget 4GB --out {search_done}", 2, "earlier finished search"),
    ("search --model {model} --budget 4GB --out {a_file}", 2, "is a file"),
    ("search --model {model} --budget 4GB --out {model}", 2, "is an input"),
    ("search --model {model} --budget 4GB --sampler bogus --out {tmp}/s", 2, "invalid choice"),
    ("search --model {model} --budget 4GB --proxy nope --out {tmp}/s", 2, "unknown proxy"),
    ("search --model {model} --budget 4GB --space {space_nan} --out {tmp}/s", 2, "sparsity"),
    ("search --model {missing_weight} --budget 4GB --out {tmp}/s", 2, "random values"),
    # -- devices, profile, estimate ----------------------------------------------------------
    ("devices --all", 2, "unrecognized arguments"),
    ("profile --engine llamacpp --formats q7_k --out {tmp}/p.yaml", 2, "not GGUF types"),
    ("profile --model {model} --out {tmp}/none/p.yaml", 2, "does not exist"),
    ("profile --model {model} --out {user_dir}", 2, "is a directory"),
    ("profile --model {model} --out {a_file}", 2, "not an autocompress profile"),
    ("profile --model {model} --formats f16,q9 --out {tmp}/p.yaml", 2, "q9"),
    ("profile --config {tmp}/none.json --out {tmp}/p.yaml", 2, "No such file"),
    ("estimate {tmp}/none.json --device jetson", 2, "not found"),
    ("estimate {plan}", 2, "--device (a device profile"),
    ("estimate {plan} --speed-profile {a_file}", 2, "not a llama.cpp speed profile"),
    ("estimate {plan} --device {profile_bad_yaml}", 2, "not valid YAML"),
    ("estimate {plan} --device {profile_nan}", 2, "bandwidth_gbps"),
    ("estimate {plan} --device {profile_inf}", 2, "peak_tflops"),
    ("estimate {plan} --device {profile_missing}", 2, "fallback"),
    ("estimate {plan} --device {profile_binary}", 2, "not a text"),
    ("estimate {plan} --device {profile_capacity}", 2, "capacity"),
    ("estimate {plan} --device {tmp}/none.yaml", 2, "does not exist"),
    ("estimate {plan} --device jetson --head-format q9", 2, "--head-format"),
    ("estimate {plan} --device jetson --kv-bits 3", 2, "invalid choice"),
    ("estimate {plan} --device jetson --config {tmp}/none.json", 2, "No such file"),
]


def _argv(template: str, inputs: dict, tmp: Path) -> list[str]:
    import shlex

    return [part.format(tmp=tmp, **inputs) for part in shlex.split(template)]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("template, code, words", ROWS, ids=[r[0][:60] for r in ROWS])
def test_bad_input_gets_one_line(template, code, words, inputs, tmp_path, capsys):
    root = Path(inputs["plan"]).parent
    before = _snapshot(root)
    assert main(_argv(template, inputs, tmp_path)) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line
             and not line.startswith("note:")]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    assert words in lines[0], err
    assert _snapshot(root) == before  # nothing already written is changed or lost


def test_the_table_covers_every_command_with_sixty_rows():
    commands = {row[0].split()[0] for row in ROWS}
    assert {"layers", "plan", "apply", "export", "eval", "sensitivity", "search", "devices",
            "profile", "estimate"} <= commands
    assert len(ROWS) >= 60
