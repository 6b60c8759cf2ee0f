"""experiments/paired_eval.py: plans compared window by window, and the README's table of it."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
from scipy import stats

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))
paired_eval = importlib.import_module("paired_eval")
readme_tables = importlib.import_module("readme_tables")
results_schema = importlib.import_module("results_schema")
sys.path.remove(str(EXPERIMENTS))

# window losses that vary far more between windows than between the plans: b is a's text
# difficulty plus a steady 0.01 nats, with a little noise
A = [3.0, 3.4, 2.7, 3.9, 3.1, 2.9, 3.6, 3.3]
NOISE = [0.002, -0.003, 0.001, 0.0, -0.002, 0.003, -0.001, 0.0]
B = [a + 0.01 + e for a, e in zip(A, NOISE)]


def test_the_gap_is_the_perplexity_ratio_with_a_paired_t_interval():
    gap = paired_eval.paired_gap(A, B)
    ppl = lambda nll: math.exp(sum(nll) / len(nll))  # noqa: E731  (equal windows)
    assert math.isclose(gap["ppl_ratio"], ppl(A) / ppl(B), rel_tol=1e-12)
    # the plain reference: mean difference ± t(0.975, n-1) × sd / √n
    d = [a - b for a, b in zip(A, B)]
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
    half = stats.t.ppf(0.975, len(d) - 1) * sd / math.sqrt(len(d))
    low, high = gap["ppl_ratio_95"]
    assert math.isclose(low, math.exp(mean - half), rel_tol=1e-9)
    assert math.isclose(high, math.exp(mean + half), rel_tol=1e-9)
    assert high < 1 and gap["p_value"] < 1e-4  # 1% resolved, though windows differ by 30%
    assert gap["windows_better"] == 8
    # unpaired, the same losses cannot tell the plans apart
    assert stats.ttest_ind(A, B).pvalue > 0.5
    flipped = paired_eval.paired_gap(B, A)
    assert math.isclose(flipped["ppl_ratio"], 1 / gap["ppl_ratio"], rel_tol=1e-12)
    assert flipped["windows_better"] == 0


def test_unpaired_window_lists_are_refused():
    with pytest.raises(ValueError, match="paired windows"):
        paired_eval.paired_gap(A, B[:-1])
    with pytest.raises(ValueError, match="paired windows"):
        paired_eval.paired_kl(A, B[:-1])


def test_the_kl_gap_is_the_mean_difference_with_a_paired_t_interval():
    """KL per window spreads with the text as the loss does; a steady 0.002 nats resolved."""
    kl_a = [0.05, 0.08, 0.03, 0.11, 0.06, 0.04, 0.09, 0.07]
    kl_b = [k + 0.002 + e / 10 for k, e in zip(kl_a, NOISE)]
    gap = paired_eval.paired_kl(kl_a, kl_b)
    d = [a - b for a, b in zip(kl_a, kl_b)]
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
    half = stats.t.ppf(0.975, len(d) - 1) * sd / math.sqrt(len(d))
    assert math.isclose(gap["kl_diff"], mean, rel_tol=1e-9)
    assert math.isclose(gap["kl_diff_95"][0], mean - half, rel_tol=1e-9)
    assert math.isclose(gap["kl_diff_95"][1], mean + half, rel_tol=1e-9)
    assert gap["kl_diff_95"][1] < 0 and gap["kl_windows_better"] == 8
    # records with per-window KLs get both gaps; one measured with --no-kl only the loss gap
    a = {"window_nll": A, "window_kl": kl_a}
    both = paired_eval.compare(a, {"window_nll": B, "window_kl": kl_b})
    assert both["kl_diff"] == gap["kl_diff"] and both["ppl_ratio"] < 1
    assert "kl_diff" not in paired_eval.compare(a, {"window_nll": B, "window_kl": []})


def test_the_readme_table_shows_each_plan_and_its_gap_to_the_first(tmp_path):
    gap = paired_eval.paired_gap(A, B)
    plan = lambda ppl, kl: {"plan": "experiments/runs/x/plan.json", "ppl": ppl,  # noqa: E731
                            "kl": kl, "total_bytes": 1_789_055_488, "wall_s": 600.0}
    data = {"protocol": {"eval": "wiki.test.raw", "comparison": "paired", "machine": "m"},
            "entries": {"qwen1.5b@4/solo": {
                "model": "qwen", "windows": 8, "eval_text": "e",
                "plans": {"searched": plan(23.5, 0.05), "gptq": plan(23.2, None)},
                "comparisons": [{"a": "searched", "b": "gptq", **gap, "kl_diff": -0.0012,
                                 "kl_diff_95": [-0.002, -0.0004], "kl_p_value": 0.004,
                                 "kl_windows_better": 6}],
                "measured_at": "2026-12-06 19:00:00"}}}
    (tmp_path / "paired_eval.json").write_text(json.dumps(data))
    text = readme_tables.paired_eval(readme_tables.Store(tmp_path))
    low, high = gap["ppl_ratio_95"]
    assert (f"| qwen1.5b@4/solo (8 windows) | gptq | 1,789.1 MB | 23.20 | – | searched / gptq: "
            f"{gap['ppl_ratio']:.4f} ({low:.4f}–{high:.4f})") in text
    assert ("| searched − gptq: -0.0012 (-0.0020 to -0.0004), p = 0.004 | searched: 8 of 8; 6 |"
            in text)
    assert "| searched | 1,789.1 MB | 23.50 | 0.0500 | – | – | – |" in text
    assert "paired_eval.py qwen1.5b@4/solo --plans searched=" in text
    data["entries"]["qwen1.5b@4/solo"]["comparisons"][0]["ppl_ratio_95"] = "narrow"
    (tmp_path / "paired_eval.json").write_text(json.dumps(data))
    with pytest.raises(results_schema.ResultsError, match="ppl_ratio_95"):
        readme_tables.paired_eval(readme_tables.Store(tmp_path))
