"""`study families` on the tiny model: one cell per family and budget, within its bytes or
said not to fit, each family's table built once, resume without running a cell twice."""

import csv
import json

import pytest

from autocompress.studies import families as families_module
from autocompress.studies.families import (
    FamiliesSettings,
    run_families,
    uniform_footprint,
)

SETTINGS = FamiliesSettings(bits=(2.0, 4.0), families=("quantization", "pruning, 16-bit", "joint"),
                            holdout_windows=1, calib_windows=2, window_len=64, context=256)


class _Stopped(Exception):
    pass


def _counting_search(monkeypatch, fail_after=None):
    calls = []
    real = _REAL  # the unpatched one, however often this is called

    def run_search(*args, **kwargs):
        if fail_after is not None and len(calls) == fail_after:
            raise _Stopped
        calls.append(args[1].name)
        return real(*args, **kwargs)

    monkeypatch.setattr(families_module, "run_search", run_search)
    return calls


_REAL = families_module.run_search


def test_a_cell_per_family_and_budget(tiny_loaded, tmp_path, monkeypatch):
    calls = _counting_search(monkeypatch)
    lines = []
    data = run_families(tiny_loaded, SETTINGS, tmp_path, progress=False, log=lines.append)
    cells = data["cells"]
    assert set(cells) == {f"{f}@{b:g}" for f in SETTINGS.families for b in SETTINGS.bits}
    assert len(calls) == len(cells)
    for cell in cells.values():
        budget = uniform_footprint(tiny_loaded, cell["bits"], SETTINGS.context)
        assert cell["budget_bytes"] == budget
        if cell["feasible"]:
            assert cell["total_bytes"] <= budget and cell["kl"] >= 0 and cell["ppl"] > 1
        else:
            assert "fit" in cell["note"] or "budget" in cell["note"]
    # 16-bit weights pruned to 90% still hold 2.6 bits a weight (1.6 + the 1-bit bitmap),
    # more than the 2.5 of uniform 2-bit g64: that cell does not fit; 2-bit g128 does
    assert not cells["pruning, 16-bit@2"]["feasible"]
    assert cells["pruning, 16-bit@4"]["feasible"]
    assert cells["quantization@2"]["feasible"] and cells["quantization@4"]["feasible"]
    # each family's table built once: its second budget read the first one's rows
    assert sum("reusing" in line and "cached rows" in line for line in lines) >= \
        len(SETTINGS.families) - sum(not c["feasible"] for c in cells.values())
    rows = list(csv.DictReader((tmp_path / "families.csv").open()))
    assert len(rows) == len(cells)
    assert (tmp_path / "figures" / "families.png").read_bytes()[:4] == b"\x89PNG"
    assert uniform_footprint(tiny_loaded, 3.5, 256) == round(
        (uniform_footprint(tiny_loaded, 3, 256) + uniform_footprint(tiny_loaded, 4, 256)) / 2)


def test_an_interrupted_study_resumes_at_the_next_cell(tiny_loaded, tmp_path, monkeypatch):
    _counting_search(monkeypatch, fail_after=2)
    with pytest.raises(_Stopped):
        run_families(tiny_loaded, SETTINGS, tmp_path, progress=False, log=lambda m: None)
    kept = json.loads((tmp_path / "families.json").read_text())["cells"]
    assert len(kept) == 2
    calls = _counting_search(monkeypatch)
    data = run_families(tiny_loaded, SETTINGS, tmp_path, resume=True, progress=False,
                        log=lambda m: None)
    assert len(calls) == len(data["cells"]) - 2
    assert all(data["cells"][k] == v for k, v in kept.items())
