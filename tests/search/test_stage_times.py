"""Stage times summed over a search's attempts (search/stage_times.py)."""

from autocompress.search.stage_times import FILE, StageTimes


def test_a_resumed_search_adds_its_stage_times_to_the_earlier_attempts(tmp_path):
    first = StageTimes(tmp_path, resume=False)
    first.record("sensitivity_s", 100.0)
    first.record("level1_s", 2.0)  # then killed in level 2
    second = StageTimes(tmp_path, resume=True)
    second.record("sensitivity_s", 0.5)  # the cached table
    second.record("level1_s", 2.0)
    second.record("level2_s", 30.0)
    assert second.totals() == {"sensitivity_s": 100.5, "level1_s": 4.0, "level2_s": 30.0}
    assert StageTimes(tmp_path, resume=True).before == second.totals()  # written as they end


def test_a_fresh_search_starts_from_zero_and_a_corrupt_file_is_said(tmp_path):
    StageTimes(tmp_path, resume=False).record("sensitivity_s", 100.0)
    fresh = StageTimes(tmp_path, resume=False)
    fresh.record("sensitivity_s", 1.0)
    assert fresh.totals() == {"sensitivity_s": 1.0}
    (tmp_path / FILE).write_text("{ not json")
    lines = []
    corrupt = StageTimes(tmp_path, resume=True, log=lines.append)
    corrupt.record("level1_s", 1.0)
    assert corrupt.totals() == {"level1_s": 1.0} and "not readable" in lines[0]
    assert StageTimes(None, resume=True).totals() == {}
