"""experiments/scale.py's bookkeeping: an entry started from another entry's table says so
only when the search really reused it, and its statistics are links, not copies."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))
scale = importlib.import_module("scale")
sys.path.remove(str(EXPERIMENTS))


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setattr(scale, "RUNS", tmp_path)
    source = tmp_path / "m@4-solo" / "search"
    (source / "statistics").mkdir(parents=True)
    (source / "statistics" / "0-attn_in.safetensors").write_bytes(b"H" * 64)
    (source / "sensitivity.cache.json").write_text('{"rows": {}}')
    (source / "timings.json").write_text(json.dumps({"sensitivity_s": 5984.4}))
    return tmp_path


def test_a_seeded_entry_links_the_statistics_and_records_the_source_when_reused(runs):
    out = runs / "m@3-solo"
    out.mkdir()
    scale._seed_table(out, "m@4/solo")
    linked = out / "search" / "statistics" / "0-attn_in.safetensors"
    source = runs / "m@4-solo" / "search" / "statistics" / "0-attn_in.safetensors"
    assert linked.stat().st_ino == source.stat().st_ino  # a hard link: no 16 GB copy
    assert (out / "search" / "sensitivity.cache.json").read_text() == '{"rows": {}}'
    (out / "search.log").write_text("reusing 196 cached rows of x/sensitivity.cache.json\n")
    assert scale._table_reuse(out) == {"table_from": "m@4/solo",
                                       "table_from_sensitivity_s": 5984.4}


def test_a_table_the_search_rebuilt_is_not_credited_to_the_source(runs):
    out = runs / "m@3-solo"
    out.mkdir()
    scale._seed_table(out, "m@4/solo")
    (out / "search.log").write_text("sensitivity cache x is for other inputs; rebuilding it\n")
    assert scale._table_reuse(out) == {}
    assert scale._table_reuse(runs / "m@4-solo") == {}  # an entry not seeded


def test_seeding_from_an_entry_without_a_table_is_one_clear_error(runs):
    with pytest.raises(SystemExit, match="no table cache .* run that entry first"):
        scale._seed_table(runs / "m@3-solo", "m@2/solo")
