"""The README's result tables are what experiments/results/*.json render (readme_tables.py
--check), every results file the renderer reads is validated (results_schema.py), and a
benchmark rerun under another protocol refuses instead of dropping stored rows (ResultFile)."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "experiments"


def _load(name: str):
    sys.path.insert(0, str(EXPERIMENTS))  # the scripts import each other by bare name
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EXPERIMENTS))


readme_tables = _load("readme_tables")
results_schema = _load("results_schema")
common = _load("common")


@pytest.fixture
def copy(tmp_path: Path) -> tuple[Path, Path]:
    """README.md and experiments/results/ copied to tmp_path."""
    readme = tmp_path / "README.md"
    shutil.copy(REPO / "README.md", readme)
    results = tmp_path / "results"
    shutil.copytree(EXPERIMENTS / "results", results)
    return readme, results


def _check(readme: Path, results: Path) -> int:
    return readme_tables.main(["--check", "--readme", str(readme), "--results", str(results)])


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2) + "\n")


def test_readme_matches_results():
    """The committed README shows exactly what the committed results render."""
    run = subprocess.run([sys.executable, str(EXPERIMENTS / "readme_tables.py"), "--check"],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, (
        f"README.md's result tables differ from experiments/results/*.json; run "
        f"`.venv/bin/python experiments/readme_tables.py` to re-render them.\n"
        f"{run.stdout}{run.stderr}")


def test_edited_number_fails_naming_its_section(copy, capsys):
    readme, results = copy
    text = readme.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| RTN 4-bit | "))
    edited = row.replace("| RTN 4-bit | ", "| RTN 4-bit | 1", 1)  # 38.14 -> 138.14
    readme.write_text(text.replace(row, edited))
    before = readme.read_bytes()

    assert _check(readme, results) == 1
    out = capsys.readouterr().out
    assert "1 result section(s) differ" in out and "section baselines:" in out
    assert f"-{edited}" in out and f"+{row}" in out  # the unified diff of that line
    assert readme.read_bytes() == before  # --check writes nothing

    # without --check the README is rewritten (atomically) and matches again
    assert readme_tables.main(["--readme", str(readme), "--results", str(results)]) == 0
    assert readme.read_text() == text
    assert _check(readme, results) == 0


def test_changed_result_fails_the_check(copy, capsys):
    readme, results = copy
    _edit_json(results / "table_fast_path.json",
               lambda d: d["entries"]["fisher"].update(fast_path_s=99.0))
    assert _check(readme, results) == 1
    out = capsys.readouterr().out
    assert "section table-fast-path:" in out and "| 99.0 |" in out


def test_missing_field_fails_validation_with_one_line(copy, capsys):
    readme, results = copy
    _edit_json(results / "baselines.json", lambda d: d["entries"]["rtn4"].pop("ppl"))
    before = readme.read_bytes()
    assert _check(readme, results) == 2
    assert readme_tables.main(["--readme", str(readme), "--results", str(results)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2  # one line per run
    assert "baselines.json: entries['rtn4'].ppl: missing" in err[0]
    assert readme.read_bytes() == before


@pytest.mark.parametrize("name, edit, message", [
    ("search_v1.json", lambda d: d["entries"]["3"].update(searched_ppl="57.4"),
     "entries['3'].searched_ppl: input should be a valid number, got str '57.4'"),
    ("baselines.json", lambda d: d["entries"]["search@rtn3"]["candidates"][1]["measured"]
     .pop("kl"), "entries['search@rtn3'].candidates[1].measured.kl: missing"),
    ("kernels.json", lambda d: d["protocol"].pop("prompt"), "protocol.prompt: missing"),
    ("baselines.json", lambda d: d["entries"].pop("base"), "entries['base']: missing"),
    ("search_v1.json", lambda d: d["entries"].update({"three": d["entries"]["3"]}),
     "entries['three']: key does not match"),
    ("latency_model.json", lambda d: d.update(extra=1), "extra: extra inputs are not permitted"),
])
def test_schema_names_file_and_field(copy, name, edit, message):
    _, results = copy
    _edit_json(results / name, edit)
    with pytest.raises(results_schema.ResultsError) as info:
        results_schema.validate(results / name)
    text = str(info.value)
    assert "\n" not in text and text.startswith(str(results / name)) and message in text, text


def test_every_results_file_has_a_schema():
    for path in sorted((EXPERIMENTS / "results").glob("*.json")):
        results_schema.validate(path)


def test_every_study_results_file_has_a_schema():
    runs = {**{name: name for name in results_schema.STUDIES}, **results_schema.STUDY_RUNS}
    for directory in (EXPERIMENTS / "results" / "studies").iterdir():
        name = runs[directory.name]  # a KeyError: a study directory without a schema
        results_schema.validate_study(directory / f"{name}.json", name)


@pytest.mark.parametrize("name, edit, message", [
    ("families", lambda d: next(iter(d["cells"].values())).pop("kl"),
     "a feasible cell needs its kl and ppl"),
    ("fronts", lambda d: d["devices"]["rtx-4090"].clear(),
     "device rtx-4090 has no plans on its front"),
    ("fronts", lambda d: d["devices"]["rtx-4090"][0].update(kl="0.1"),
     "devices.rtx-4090[0].kl: input should be a valid number, got str '0.1'"),
    ("layers", lambda d: d["protocol"].pop("depth_bins"), "protocol.depth_bins: missing"),
])
def test_a_malformed_study_is_one_line_naming_file_and_field(copy, capsys, name, edit, message):
    readme, results = copy
    path = results / "studies" / name / f"{name}.json"
    _edit_json(path, edit)
    with pytest.raises(results_schema.ResultsError) as info:
        results_schema.validate_study(path, name)
    text = str(info.value)
    assert "\n" not in text and text.startswith(str(path)) and message in text, text
    before = readme.read_bytes()
    assert _check(readme, results) == 2  # the renderer says so, and writes nothing
    assert message in capsys.readouterr().err
    assert readme.read_bytes() == before


def test_timings_render_whatever_the_engine_wrote(copy):
    """The search engine writes level1_s/level2_s/level3_s or measure_s now, solve_s before:
    each renders as written; none is filled in."""
    _, results = copy
    _edit_json(results / "baselines.json", lambda d: d["entries"]["search@rtn3"].update(
        timings_s={"sensitivity_s": 12.0, "level1_s": 1.5, "measure_s": 30.0}))
    body = readme_tables.search_candidates(readme_tables.Store(results))
    assert "Timings: sensitivity 12 s, level 1 (proxy) 1.5 s, measured check 30 s." in body
    assert "solve" not in body and "level 2" not in body

    _edit_json(results / "search_v1.json",
               lambda d: d["entries"]["3"]["timings_s"].pop("level3_s"))
    row = next(line for line in readme_tables.search_v1(readme_tables.Store(results)).splitlines()
               if line.startswith("| uniform 3-bit"))
    assert row.endswith("(1 / 2 / 210 / —) |")


def test_a_search_rows_recovery_says_its_rate_and_whether_it_was_kept(copy):
    """A recovery the search refused (not lower on the held-out windows) is said as tried and
    not kept; a kept one says its rate and the rates it backed off from."""
    _, results = copy

    def refused(data):
        stages = data["entries"]["sr-kd64:4"]["stages"]
        tried = {"method": "kd", "kept": False, "steps": 60, "best_step": 0, "lr": 0.002,
                 "lr_abandoned": [], "measured": {"kl": 0.1157}}
        stages.update(recovery=None, recovery_tried=tried)
        stages["holdout"].pop("before_recovery")

    _edit_json(results / "search.json", refused)
    body = readme_tables.search(readme_tables.Store(results))
    assert "KD recovery (lr 0.002, tried, not kept)" in body
    assert ("KD recovery tried and not kept: held-out KL 0.1157, best step 0 of 60, at lr "
            "0.002)") in body

    _edit_json(results / "search.json", lambda d: d["entries"]["sr-kd:3"]["stages"][
        "recovery"].update(lr=5e-4, lr_abandoned=[2e-3]))
    body = readme_tables.search(readme_tables.Store(results))
    assert "at lr 0.0005 (backed off from 0.002: the first validation was worse)" in body
    assert "KD recovery (lr 0.002 → 0.0005)" in body

    _edit_json(results / "search.json", lambda d: d["entries"]["sr-kd:3"]["stages"][
        "recovery"].update(lr=5e-4, lr_abandoned=[], lr_lowered_at=[140]))
    body = readme_tables.search(readme_tables.Store(results))
    assert "at lr 0.0005 (quartered at step 140: validation had stalled)" in body
    assert "KD recovery (lr 0.002 → 0.0005)" in body


def test_a_recovery_row_says_where_a_stall_quartered_its_rate(copy):
    _, results = copy
    _edit_json(results / "recovery.json", lambda d: d["entries"]["kd-64w-cos"]["kd"].update(
        lr=1.25e-4, lr_lowered_at=[140, 300]))
    row = next(line for line in readme_tables.recovery(readme_tables.Store(results)).splitlines()
               if line.startswith("| kd-64w-cos |"))
    assert ("| 0.002 → 0.0005 → 0.000125, cosine (quartered at steps 140, 300: "
            "validation had stalled) |") in row


def test_missing_results_file_renders_not_measured(copy, capsys):
    readme, results = copy
    (results / "table_fast_path.json").unlink()
    assert _check(readme, results) == 1
    assert "+(not measured yet: no table_fast_path.json)" in capsys.readouterr().out


def test_unknown_marker_is_an_error(copy, capsys):
    readme, results = copy
    readme.write_text(readme.read_text() + "\n<!-- results:nope -->\nx\n<!-- /results:nope -->\n")
    assert _check(readme, results) == 2
    assert "markers without a renderer: nope" in capsys.readouterr().err


# ---------------------------------------------------------------- ResultFile


PROTOCOL = {"model": "m", "eval": "40 windows", "machine": "here"}


def _stored(root: Path) -> dict:
    rf = common.ResultFile("r.json", PROTOCOL, root=root)
    rf.put("a", {"ppl": 1.0})
    rf.put("b", {"ppl": 2.0})
    return json.loads((root / "r.json").read_text())


def test_result_file_resumes_under_the_same_protocol(tmp_path):
    _stored(tmp_path)
    rf = common.ResultFile("r.json", dict(PROTOCOL), root=tmp_path)
    assert rf.has("a") and rf.has("b")


def test_result_file_refuses_another_protocol(tmp_path, monkeypatch):
    monkeypatch.delenv(common.FRESH_ENV, raising=False)
    before = (_stored(tmp_path), (tmp_path / "r.json").read_bytes())[1]
    other = {"model": "m", "eval": "8 windows", "machine": "here", "calibration": "c"}
    with pytest.raises(common.ProtocolMismatch) as info:
        common.ResultFile("r.json", other, root=tmp_path)
    text = str(info.value)
    assert "another protocol (differs in: calibration, eval)" in text
    assert "eval: stored '40 windows'; this run '8 windows'" in text
    assert "calibration: not in the stored protocol" in text
    assert "its 2 stored entries" in text and common.FRESH_ENV in text
    assert (tmp_path / "r.json").read_bytes() == before  # nothing dropped, nothing written
    assert isinstance(info.value, SystemExit)  # a script stops with the message, exit 1


def test_result_file_refuses_an_unreadable_file(tmp_path, monkeypatch):
    monkeypatch.delenv(common.FRESH_ENV, raising=False)
    (tmp_path / "r.json").write_text("{not json")
    with pytest.raises(common.ProtocolMismatch, match="cannot be read as a results file"):
        common.ResultFile("r.json", PROTOCOL, root=tmp_path)


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_result_file_starts_afresh_only_when_told(tmp_path, monkeypatch, capsys, how):
    _stored(tmp_path)
    other = dict(PROTOCOL, eval="8 windows")
    if how == "environment":
        monkeypatch.setenv(common.FRESH_ENV, "1")
        rf = common.ResultFile("r.json", other, root=tmp_path)
    else:
        monkeypatch.delenv(common.FRESH_ENV, raising=False)
        rf = common.ResultFile("r.json", other, root=tmp_path, fresh=True)
    assert "differs in: eval" in capsys.readouterr().err  # said, not silent
    assert not rf.has("a")
    rf.put("c", {"ppl": 3.0})
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["protocol"] == other and list(data["entries"]) == ["c"]


def test_two_runs_filling_one_file_keep_each_others_rows(tmp_path):
    """A long search and a quick re-measurement write the same file: neither drops or reverts
    what the other wrote after it read the file."""
    _stored(tmp_path)
    search = common.ResultFile("r.json", PROTOCOL, root=tmp_path)
    remeasure = common.ResultFile("r.json", PROTOCOL, root=tmp_path)
    remeasure.put("a", {"ppl": 1.0, "speed": 9.0})
    search.put("search@x", {"ppl": 0.5})  # its copy of "a" is the old one
    remeasure.put("b", {"ppl": 2.0, "speed": 8.0})
    entries = json.loads((tmp_path / "r.json").read_text())["entries"]
    assert list(entries) == ["a", "b", "search@x"]
    assert entries["a"]["speed"] == 9.0 and entries["b"]["speed"] == 8.0
    assert entries["search@x"]["ppl"] == 0.5


def test_the_proxies_study_renders_each_models_proxies_per_family(tmp_path):
    from autocompress.studies.proxies import _csv  # noqa: F401  (the study's own module loads)

    corr = lambda rho, n: {"spearman": rho, "kendall": rho, "plans": n}  # noqa: E731
    data = {"protocol": {"models": ["smollm2-135m", "/q/qwen.gguf"], "proxies": ["fisher"],
                         "space": "joint", "families": ["quantization", "2:4"],
                         "plans_per_family": 3, "calib_windows": 8, "holdout_windows": 4,
                         "window_len": 512, "calib_text": "/d/wiki.valid.tokens", "seed": 0,
                         "plans": "…", "measured": "KL on 4 windows", "cost": "wall seconds"},
            "models": {spec: {"plans": {"quantization/0": {}, "2:4/0": {}},
                              "proxies": {"fisher": {"table_s": s, "attempts_s": a,
                                                     "families": {
                                  "quantization": corr(0.8, 3), "2:4": corr(None, 2),
                                  "all": corr(0.5, 6)}}}}
                       for spec, s, a in (("smollm2-135m", 201.3, [201.3]),
                                          ("/q/qwen.gguf", 3300.0, [1000.0, 2300.0]))}}
    path = tmp_path / "studies" / "proxies" / "proxies.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    text = readme_tables.studies_proxies(readme_tables.Store(tmp_path))
    assert "| smollm2-135m | fisher | 201 s | +0.80 | – | +0.50 |" in text
    assert "| qwen.gguf | fisher | 3300 s (2 attempts) | +0.80 | – | +0.50 |" in text
    data["models"]["smollm2-135m"]["proxies"]["fisher"]["families"]["all"]["plans"] = "six"
    path.write_text(json.dumps(data))
    with pytest.raises(results_schema.ResultsError, match="families.all.plans"):
        readme_tables.studies_proxies(readme_tables.Store(tmp_path))


def test_the_seed_spread_sets_each_seed_beside_the_scale_run(tmp_path):
    scale = json.loads((EXPERIMENTS / "results" / "scale.json").read_text())
    base = scale["entries"]["smollm2@3"]["searched"]["ppl"]
    (tmp_path / "scale.json").write_text(json.dumps(scale))
    run = lambda seed, ppl: {"seed": seed, "ppl": ppl, "kl": 0.7, "total_bytes": 1,  # noqa: E731
                             "chosen": "optuna #3", "holdout_kl": 0.65, "wall_s": 900.0}
    data = {"protocol": {"search": "s", "budget": "b", "eval": "e", "machine": "m"},
            "entries": {"smollm2@3/seed2": run(2, base + 4.0),
                        "smollm2@3/seed1": run(1, base - 2.0)}}
    (tmp_path / "seed_spread.json").write_text(json.dumps(data))
    text = readme_tables.seed_spread(readme_tables.Store(tmp_path))
    lines = text.splitlines()
    assert lines[2].startswith(f"| smollm2@3 | 0 (scale.json) | {base:.2f} |")
    assert lines[3].startswith(f"| smollm2@3 | 1 | {base - 2:.2f} |")  # in seed order
    assert lines[4].startswith(f"| smollm2@3 | 2 | {base + 4:.2f} |")
    mean = base + 2 / 3
    std = (((base - mean) ** 2 + (base - 2 - mean) ** 2 + (base + 4 - mean) ** 2) / 2) ** 0.5
    assert f"3 seeds, test ppl {base - 2:.2f}–{base + 4:.2f} (spread 6.00" in text
    assert f"standard deviation {std:.2f})" in text
    data["entries"]["smollm2@3/seed1"]["ppl"] = "low"
    (tmp_path / "seed_spread.json").write_text(json.dumps(data))
    with pytest.raises(results_schema.ResultsError, match="ppl"):
        readme_tables.seed_spread(readme_tables.Store(tmp_path))


def test_a_scale_row_with_a_reused_table_shows_the_source_table_time_marked(tmp_path):
    scale = json.loads((EXPERIMENTS / "results" / "scale.json").read_text())
    entry = dict(scale["entries"]["smollm2@4"], wall_s=600.0,
                 timings_s={"sensitivity_s": 4.0, "level1_s": 1.0, "level2_s": 180.0,
                            "level3_s": 300.0},
                 table_from="smollm2@4", table_from_sensitivity_s=6000.0)
    scale["entries"] = {"smollm2@4": scale["entries"]["smollm2@4"], "smollm2@3/reused": entry}
    (tmp_path / "scale.json").write_text(json.dumps(scale))
    text = readme_tables.scale(readme_tables.Store(tmp_path))
    row = next(line for line in text.splitlines() if line.startswith("| smollm2@3/reused |"))
    # the source's 100 minutes, marked, in place of this run's 4 s cache read
    assert "| 10.0 min (100.0* / 3.0 / 5.0 min) |" in row
    assert "smollm2@3/reused started from smollm2@4's table" in text
    plain = next(line for line in text.splitlines() if line.startswith("| smollm2@4 |"))
    assert "*" not in plain
