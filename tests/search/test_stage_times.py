"""Stage times summed over a search's attempts (search/stage_times.py)."""

import json
import time

import pytest

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


def test_a_stage_cut_short_keeps_the_time_it_ran(tmp_path):
    times = StageTimes(tmp_path, resume=False)
    try:
        with times.stage("sensitivity_s"):
            time.sleep(0.2)
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert StageTimes(tmp_path, resume=True).before["sensitivity_s"] >= 0.2


def test_a_search_interrupted_in_its_table_reports_both_attempts_time(tiny_loaded, tmp_path,
                                                                       monkeypatch):
    """The 1.5B table takes hours and is built over several attempts: search.json's
    sensitivity_s is their sum, not the last attempt's cache read."""
    from autocompress.accounting import model_footprint
    from autocompress.plan import LayerConfig
    from autocompress.search import engine
    from autocompress.search.space import SearchSpace

    real_build = engine.build_table

    def slow_then_interrupted(*args, **kwargs):
        time.sleep(3.0)  # well above the tiny table's own build
        raise KeyboardInterrupt

    budget = model_footprint(tiny_loaded, {l.name: LayerConfig(bits=4)
                                           for l in tiny_loaded.layers}, context=256).total
    space = SearchSpace.bits_only([2, 4, 8])

    def search(resume):
        settings = engine.SearchSettings(budget=budget, n_calib=2, n_holdout=2, window_len=64,
                                         context=256, resume=resume)
        return engine.run_search(tiny_loaded, space, settings, out_dir=tmp_path,
                                 progress=False, log=lambda m: None)

    monkeypatch.setattr(engine, "build_table", slow_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        search(resume=False)
    monkeypatch.setattr(engine, "build_table", real_build)
    search(resume=True)
    timings = json.loads((tmp_path / "search.json").read_text())["timings_s"]
    assert timings["sensitivity_s"] >= 3.0
