"""The output policy (autocompress/outputs.py), in the library and in every command that writes:
an earlier output of the tool is replaced whole and said; a user's files are never removed;
temporary names never collide with a user's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autocompress.cli import main
from autocompress.errors import AutocompressError
from autocompress.outputs import MARKER, check_out_dir, dir_state, publish_dir


def _fill(text: str):
    def fill(tmp: Path) -> None:
        (tmp / "weights.bin").write_text(text)
        (tmp / "plan.json").write_text("{}")
    return fill


def _siblings(path: Path) -> set[str]:
    return {p.name for p in path.parent.iterdir()}


def test_a_new_output_then_its_replacement_as_a_whole(tmp_path):
    out, said = tmp_path / "out", []
    publish_dir(out, "apply", _fill("one"))
    assert dir_state(out).kind == "ours"
    publish_dir(out, "apply", _fill("two"), log=said.append)
    assert (out / "weights.bin").read_text() == "two"
    assert said and "replaced the earlier `apply` output" in said[0]
    assert _siblings(out) == {"out"}  # no temporary or backup left beside it


def test_a_users_directory_is_refused_and_with_force_keeps_its_files(tmp_path):
    out = tmp_path / "models"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "plan.json").write_text("an old plan of mine")
    with pytest.raises(AutocompressError, match="did not write .*notes.txt"):
        publish_dir(out, "apply", _fill("x"))
    assert (out / "plan.json").read_text() == "an old plan of mine"
    publish_dir(out, "apply", _fill("x"), force=True)
    assert (out / "notes.txt").read_text() == "mine"  # nothing else removed
    assert (out / "weights.bin").read_text() == "x"
    # still not "ours only": the user's notes are there, so a later run needs --force again
    with pytest.raises(AutocompressError, match="notes.txt"):
        check_out_dir(out, "apply")


def test_files_added_to_an_earlier_output_make_it_the_users(tmp_path):
    out = tmp_path / "out"
    publish_dir(out, "apply", _fill("one"))
    (out / "README.md").write_text("my notes on this model")
    with pytest.raises(AutocompressError, match="README.md"):
        publish_dir(out, "apply", _fill("two"))
    assert (out / "weights.bin").read_text() == "one"


def test_temporary_names_never_touch_a_users_lookalikes(tmp_path):
    out = tmp_path / "out"
    for name in ("out.tmp", "out.old", ".out.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep.txt").write_text(name)
    publish_dir(out, "apply", _fill("one"))
    publish_dir(out, "apply", _fill("two"))
    for name in ("out.tmp", "out.old", ".out.tmp"):
        assert (tmp_path / name / "keep.txt").read_text() == name


def test_a_failure_while_writing_leaves_the_earlier_output_and_no_temporaries(tmp_path):
    out = tmp_path / "out"
    publish_dir(out, "apply", _fill("one"))

    def broken(tmp: Path) -> None:
        (tmp / "weights.bin").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        publish_dir(out, "apply", broken)
    assert (out / "weights.bin").read_text() == "one"
    assert _siblings(out) == {"out"}


def test_an_output_of_another_command_is_not_replaced_silently(tmp_path):
    out = tmp_path / "out"
    publish_dir(out, "apply", _fill("one"))
    with pytest.raises(AutocompressError, match="output of `autocompress apply`"):
        check_out_dir(out, "search")


def test_a_directory_that_holds_or_is_inside_an_input_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(AutocompressError, match="holds an input"):
        check_out_dir(tmp_path, "apply", inputs=[model])
    with pytest.raises(AutocompressError, match="inside the input"):
        check_out_dir(model / "compressed", "apply", inputs=[model])


# -- per command -------------------------------------------------------------------------------

@pytest.fixture
def plan_file(tiny_model_dir, tmp_path):
    path = tmp_path / "plan.json"
    assert main(["plan", "--model", str(tiny_model_dir), "--bits", "4", "--out", str(path)]) == 0
    return path


def test_apply_replaces_its_earlier_output_and_says_so(tiny_model_dir, plan_file, tmp_path,
                                                       capsys):
    out = tmp_path / "compressed"
    argv = ["apply", str(plan_file), "--model", str(tiny_model_dir), "--out", str(out)]
    assert main(argv) == 0
    first = (out / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv + ["--packed"]) == 0
    assert "replaced the earlier `apply` output" in capsys.readouterr().err
    assert (out / "packed.safetensors").is_file()
    assert (out / "model.safetensors").stat().st_mtime_ns != first
    assert json.loads((out / MARKER).read_text())["command"] == "apply"


def test_apply_into_a_users_directory_needs_force_and_keeps_their_files(tiny_model_dir,
                                                                        plan_file, tmp_path):
    out = tmp_path / "models"
    out.mkdir()
    (out / "other-model.gguf").write_bytes(b"GGUF mine")
    argv = ["apply", str(plan_file), "--model", str(tiny_model_dir), "--out", str(out)]
    assert main(argv) == 2
    assert sorted(p.name for p in out.iterdir()) == ["other-model.gguf"]
    assert main(argv + ["--force"]) == 0
    assert (out / "other-model.gguf").read_bytes() == b"GGUF mine"
    assert (out / "model.safetensors").is_file()


def test_plan_overwrites_a_plan_but_not_a_users_file(tiny_model_dir, plan_file, tmp_path):
    argv = ["plan", "--model", str(tiny_model_dir), "--bits", "8", "--out"]
    assert main(argv + [str(plan_file)]) == 0
    assert json.loads(plan_file.read_text())["default"]["bits"] == 8
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "notes"}')
    assert main(argv + [str(mine)]) == 2
    assert json.loads(mine.read_text()) == {"my": "notes"}
    assert main(argv + [str(mine), "--force"]) == 0
    assert json.loads(mine.read_text())["default"]["bits"] == 8


def test_sensitivity_checks_both_files_before_the_work(tiny_model_dir, tmp_path):
    png = tmp_path / "table.png"
    png.write_text("my drawing, not a PNG")
    argv = ["sensitivity", "--model", str(tiny_model_dir), "--calib-windows", "2",
            "--window-len", "32", "--space", "bits", "--out", str(tmp_path / "table.json")]
    assert main(argv) == 2
    assert not (tmp_path / "table.json").exists()
    assert png.read_text() == "my drawing, not a PNG"
    png.unlink()
    assert main(argv) == 0
    assert main(argv) == 0  # its own earlier table and heat map are replaced


def _search(tiny_model_dir, out, *extra):
    return ["search", "--model", str(tiny_model_dir), "--budget", "250KB", "--context", "64",
            "--bits", "2,4,8", "--calib-windows", "2", "--holdout-windows", "2",
            "--window-len", "64", "--trials", "2", "--eval-top", "0", "--out", str(out), *extra]


def test_search_reruns_need_resume_or_force_and_force_removes_only_its_files(tiny_model_dir,
                                                                           tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_search(tiny_model_dir, out)) == 0
    plan = (out / "plan.json").read_text()
    capsys.readouterr()
    for trials in ("0", "3"):  # the old bug: --trials 0 overwrote a finished search
        argv = _search(tiny_model_dir, out)
        argv[argv.index("--trials") + 1] = trials
        assert main(argv) == 2
        assert "earlier finished search" in capsys.readouterr().err
        assert (out / "plan.json").read_text() == plan
    assert main(_search(tiny_model_dir, out, "--resume")) == 0
    assert main(_search(tiny_model_dir, out, "--force")) == 0
    assert "--force: removed the earlier search's files" in capsys.readouterr().err
    (out / "my-notes.txt").write_text("mine")
    assert main(_search(tiny_model_dir, out, "--force")) == 0
    assert (out / "my-notes.txt").read_text() == "mine"


def test_a_search_that_stopped_before_writing_anything_is_not_an_earlier_search(tiny_model_dir,
                                                                              tmp_path):
    out = tmp_path / "run"
    argv = _search(tiny_model_dir, out)
    argv[argv.index("--budget") + 1] = "1KB"  # no plan fits: stops after the marker
    assert main(argv) == 2
    assert main(_search(tiny_model_dir, out)) == 0


def test_optunas_lock_release_leftover_is_the_searchs_own_and_is_cleared(tiny_model_dir,
                                                                         tmp_path):
    """Optuna releases the journal's lock by renaming study.journal.lock to
    study.journal.lock<uuid>.rename and unlinking that; a kill between the two (seen once in
    the fault drill) must not make the search directory a user's on --resume. A user's file
    of a like name (not after the lock's name) still is."""
    out = tmp_path / "run"
    assert main(_search(tiny_model_dir, out)) == 0
    leftover = out / "study.journal.lock3f2a9c1e-5b7d-4e21-a073-a57118b7ac73.rename"
    leftover.write_text("")
    assert dir_state(out).kind == "ours"
    assert main(_search(tiny_model_dir, out, "--resume")) == 0
    assert not leftover.exists()
    (out / "notes.rename").write_text("mine")
    assert dir_state(out).kind == "foreign"
