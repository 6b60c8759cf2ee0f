import csv
import json

import numpy as np
import pytest

from autocompress.search.pareto import non_dominated, quality, write_pareto


def test_non_dominated_two_objectives():
    points = [
        {"a": 1.0, "b": 5.0},  # front
        {"a": 2.0, "b": 2.0},  # front
        {"a": 3.0, "b": 3.0},  # dominated by 1
        {"a": 5.0, "b": 1.0},  # front
        {"a": 5.0, "b": 2.0},  # dominated by 3 (equal a, worse b)
    ]
    assert non_dominated(points, ["a", "b"]) == [0, 1, 3]


def test_non_dominated_skips_none_missing_and_nan():
    points = [
        {"a": 0.0, "b": None},  # would dominate everything, but cannot be compared
        {"a": 0.0},
        {"a": float("nan"), "b": 0.0},
        {"a": 2.0, "b": 2.0},
        {"a": 3.0, "b": 3.0},
    ]
    assert non_dominated(points, ["a", "b"]) == [3]
    assert non_dominated([{"a": None}], ["a"]) == []
    assert non_dominated([], ["a"]) == []


def test_non_dominated_keeps_ties():
    points = [{"a": 1, "b": 2}, {"a": 1, "b": 2}, {"a": 1, "b": 3}]
    assert non_dominated(points, ["a", "b"]) == [0, 1]


def test_non_dominated_three_objectives_matches_brute_force():
    rng = np.random.default_rng(0)
    points = [dict(zip("xyz", map(float, row))) for row in rng.integers(0, 6, size=(60, 3))]

    def dominated(p):
        return any(all(q[k] <= p[k] for k in "xyz") and any(q[k] < p[k] for k in "xyz")
                   for q in points)

    assert non_dominated(points, list("xyz")) == [i for i, p in enumerate(points)
                                                  if not dominated(p)]


def record(label, source, mb, predicted=None, kl_fast=None, kl=None, tps=None, chosen=False):
    return {"label": label, "source": source, "total_bytes": int(mb * 1e6), "predicted": predicted,
            "kl_fast": kl_fast, "kl": kl, "ppl": None if kl is None else 20.0 + kl,
            "tokens_per_s": tps, "chosen": chosen}


RECORDS = [
    record("proxy optimum", "proxy", 60, predicted=0.05, kl=0.08, tps=90.0, chosen=True),
    record("no 2-bit", "proxy", 62, predicted=0.04, kl=0.09, tps=85.0),
    record("trial 3", "optuna", 55, predicted=0.30, kl_fast=0.25, tps=110.0),
    record("trial 7", "optuna", 70, predicted=0.01, tps=70.0),
    record("trial 9", "tune", 58, tps=100.0),  # no quality figure: not on any front
    record("uniform 4b g64 asym rtn", "uniform", 75, kl=0.02, tps=60.0),
    record("uniform 3b g64 asym rtn", "uniform", 57, kl=0.9, tps=105.0),
    record("llama.cpp-style 3/4 (v, down at 4 bits in first/last eighth + every third block)",
           "recipe", 61, kl=0.5, tps=95.0),
]


def test_quality_prefers_full_fidelity():
    assert quality(RECORDS[0]) == 0.08
    assert quality(RECORDS[2]) == 0.25
    assert quality(RECORDS[3]) == 0.01
    assert quality(RECORDS[4]) is None


@pytest.mark.parametrize("with_speed", [True, False])
def test_write_pareto(tmp_path, with_speed):
    records = [dict(r) if with_speed else {**r, "tokens_per_s": None} for r in RECORDS]
    paths = write_pareto(tmp_path / "out", records, "SmolLM2-135M at 62 MB")
    assert set(paths) == {"json", "csv", "png"}
    assert {p.name for p in paths.values()} == {"pareto.json", "pareto.csv", "pareto.png"}
    # nothing else left behind (temp files are dot-files: list them all)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "pareto.csv", "pareto.json", "pareto.png"]

    doc = json.loads(paths["json"].read_text())
    objectives = ["quality", "total_bytes"] + (["neg_tokens_per_s"] if with_speed else [])
    assert doc["title"] == "SmolLM2-135M at 62 MB"
    assert doc["objectives"] == objectives
    assert doc["all"] == records
    points = [{"quality": quality(r), "total_bytes": r["total_bytes"],
               "neg_tokens_per_s": None if r["tokens_per_s"] is None else -r["tokens_per_s"]}
              for r in records]
    expected = non_dominated(points, objectives)
    assert doc["front"] == [records[i] for i in expected]
    assert 4 not in expected  # the trial without any quality figure

    with paths["csv"].open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(records)
    assert list(rows[0]) == ["label", "source", "total_bytes", "predicted", "kl_fast", "kl",
                             "ppl", "tokens_per_s", "on_front", "chosen"]
    assert [r["label"] for r in rows] == [r["label"] for r in records]
    assert [i for i, r in enumerate(rows) if r["on_front"] == "True"] == expected
    assert [r["chosen"] for r in rows] == [str(r["chosen"]) for r in records]
    assert rows[4]["kl"] == "" and rows[0]["kl"] == "0.08"

    assert paths["png"].read_bytes().startswith(b"\x89PNG")


def test_write_pareto_overwrites_and_handles_edge_cases(tmp_path):
    # one plan, numpy scalars, nothing with a quality figure, then a rewrite in place
    write_pareto(tmp_path, [record("a", "proxy", 10, tps=np.float64(5.0))], "empty")
    paths = write_pareto(tmp_path, [record("b", "uniform", 10, kl=np.float32(0.5))], "one")
    doc = json.loads(paths["json"].read_text())
    assert doc["title"] == "one" and [r["label"] for r in doc["front"]] == ["b"]
    assert paths["png"].read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "pareto.csv", "pareto.json", "pareto.png"]
