import pytest

from autocompress.errors import AutocompressError
from autocompress.provenance import LEGACY, BuildOverrides, Provenance, calibration_windows, resolve


def test_recorded_provenance_is_used_and_said():
    recorded = Provenance(calib_text="/x/valid.txt", calib_windows=8, mode="parallel",
                          calib_digest="ab")
    used, notes = resolve(recorded, BuildOverrides())
    assert used == recorded
    assert len(notes) == 1 and "reproducing" in notes[0] and "parallel" in notes[0]


def test_overrides_depart_from_the_plan_and_say_so():
    recorded = Provenance(calib_text="/x/valid.txt", calib_windows=8, calib_digest="ab")
    used, notes = resolve(recorded, BuildOverrides(mode="parallel"))
    assert used.mode == "parallel" and used.calib_digest == "ab"  # same windows: still checked
    assert "overriding" in notes[0] and "mode parallel" in notes[0]
    used, _ = resolve(recorded, BuildOverrides(calib_windows=4))
    assert used.calib_windows == 4 and used.calib_digest is None  # other windows: no digest
    # asking for exactly what the plan records is no override
    used, notes = resolve(recorded, BuildOverrides(calib_windows=8, mode="sequential"))
    assert used == recorded and "reproducing" in notes[0]


def test_v1_plan_builds_the_old_default_way():
    used, notes = resolve(None, None)
    assert used == LEGACY and (used.mode, used.calib_windows, used.calib_text) == \
        ("sequential", 16, None)
    assert "no provenance" in notes[0]


def test_changed_or_missing_calibration_text_is_refused(tiny_loaded, tmp_path):
    from autocompress.data import calibration_data

    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    digest = calibration_data(tiny_loaded.tokenizer, str(text), 2, 0, 64).digest
    good = Provenance(calib_text=str(text), calib_windows=2, window_len=64, calib_digest=digest)
    assert calibration_windows(tiny_loaded.tokenizer, good).shape == (2, 64)
    text.write_text("Another text entirely, about other things. " * 400)
    with pytest.raises(AutocompressError, match="differ from the plan"):
        calibration_windows(tiny_loaded.tokenizer, good)
    text.unlink()
    with pytest.raises(AutocompressError, match="not there"):
        calibration_windows(tiny_loaded.tokenizer, good)


def test_plans_recorded_before_gguf_source_copy_are_built_without_it():
    """New plans keep a source GGUF's tensors in their own type (llama-quantize's rule); a
    provenance written before the field existed reproduces its old, requantized build."""
    assert Provenance().gguf_source_copy is True
    assert Provenance.from_dict(Provenance().to_dict()).gguf_source_copy is True
    older = {k: v for k, v in Provenance().to_dict().items() if k != "gguf_source_copy"}
    assert Provenance.from_dict(older).gguf_source_copy is False
    assert LEGACY.gguf_source_copy is False
    with pytest.raises(AutocompressError, match="gguf_source_copy must be true or false"):
        Provenance.from_dict({**older, "gguf_source_copy": "yes"})


def test_the_compute_dtype_is_recorded_and_older_plans_were_float32():
    """A plan computed in bfloat16 says so, and one written before the field was float32 (the
    only precision the tool had); asking for another dtype is an override, said as one."""
    older = {k: v for k, v in Provenance().to_dict().items() if k != "compute_dtype"}
    assert Provenance.from_dict(older).compute_dtype == "float32"
    recorded = Provenance(compute_dtype="bfloat16")
    assert "computed in bfloat16" in recorded.describe()
    assert "computed in" not in Provenance().describe()
    used, notes = resolve(recorded, BuildOverrides(compute_dtype="float32"))
    assert used.compute_dtype == "float32" and notes == [
        "computing in float32, not the plan's bfloat16: the figures will differ from those the "
        "search measured"]
    used, notes = resolve(recorded, BuildOverrides(compute_dtype="bfloat16"))
    assert used == recorded and "reproducing" in notes[0]
    with pytest.raises(AutocompressError, match="compute_dtype must be one of"):
        Provenance(compute_dtype="float8")
