"""Plans of one model measured on the same test windows and compared window by window.

Two plans' perplexities on N windows each spread with the text (one window is easy, the next
hard), so a gap of 1% between them cannot be read from the perplexities alone. Measured on the
same windows, the difference of their mean next-token losses per window cancels the text's
difficulty: the first plan against each other one gives the ratio of perplexities
exp(mean difference) with a 95% interval (paired t over windows, scipy) and how many windows
each plan won. Windows hold equal token counts, so that ratio is exactly ppl_a / ppl_b.

Each plan's `autocompress eval --json` is kept in experiments/runs/paired_eval/LABEL/ as it
finishes (a rerun resumes after the last one); the entry LABEL of
experiments/results/paired_eval.json is written when all are measured.

    .venv/bin/python experiments/paired_eval.py LABEL --plans searched=PLAN,rtn=PLAN,... \\
        [--windows 40] [--no-kl]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    REPO, ResultFile, check_data, eval_protocol, machine, shown)

RUNS = REPO / "experiments" / "runs" / "paired_eval"
WINDOW_LEN = 512  # `autocompress eval`'s default, which scale._eval uses


def _paired(a: list[float], b: list[float]) -> tuple[float, float, float, float, int]:
    """Per-window figures of two plans on the same windows: mean of a - b, its 95% paired-t
    interval (scipy's ttest_rel), the p-value, and the windows where a is lower."""
    from scipy.stats import ttest_rel

    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired windows needed: {len(a)} against {len(b)}")
    test = ttest_rel(a, b)
    low, high = test.confidence_interval(0.95)
    return (sum(x - y for x, y in zip(a, b)) / len(a), float(low), float(high),
            float(test.pvalue), sum(x < y for x, y in zip(a, b)))


def paired_gap(nll_a: list[float], nll_b: list[float]) -> dict:
    """Plan a against plan b from their per-window mean losses on the same windows:
    ppl_a / ppl_b with its 95% interval, the paired t-test's p-value, windows a won."""
    import math

    mean, low, high, p, won = _paired(nll_a, nll_b)
    return {"ppl_ratio": math.exp(mean), "ppl_ratio_95": [math.exp(low), math.exp(high)],
            "p_value": p, "windows_better": won}


def paired_kl(kl_a: list[float], kl_b: list[float]) -> dict:
    """Plan a against plan b from their per-window mean KLs to the uncompressed model on the
    same windows: KL_a - KL_b (nats per token) with its 95% paired-t interval, the p-value,
    windows where a's KL is lower. The search ranks plans by KL, so this is its own claim."""
    mean, low, high, p, won = _paired(kl_a, kl_b)
    return {"kl_diff": mean, "kl_diff_95": [low, high], "kl_p_value": p,
            "kl_windows_better": won}


def compare(a: dict, b: dict) -> dict:
    """Two ``eval --json`` records on the same windows: the perplexity gap, and the KL gap
    when both measured each window's KL."""
    gap = paired_gap(a["window_nll"], b["window_nll"])
    if a.get("window_kl") and b.get("window_kl"):
        gap.update(paired_kl(a["window_kl"], b["window_kl"]))
    return gap


def _measure(plan: Path, windows: int, no_kl: bool) -> dict:
    from scale import _eval  # the scale entries' own evaluation, the same windows

    t = time.perf_counter()
    record = _eval(plan, windows, no_kl)
    record["wall_s"] = round(time.perf_counter() - t, 1)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("label", help="entry key, e.g. qwen1.5b@4/solo")
    parser.add_argument("--plans", required=True,
                        help="NAME=PLAN,... (the first is compared against each other one)")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--no-kl", action="store_true", help="perplexity only (half the time)")
    args = parser.parse_args()
    plans = {}
    for item in args.plans.split(","):
        name, _, path = item.partition("=")
        if not path or not Path(path).is_file():
            raise SystemExit(f"--plans: {item!r} is not NAME=PLAN with an existing plan file")
        plans[name] = Path(path)
    if len(plans) < 2:
        raise SystemExit("--plans: give at least two plans to compare")
    check_data()
    results = ResultFile("paired_eval.json", {
        "eval": f"wiki.test.raw, first N non-overlapping windows of {WINDOW_LEN} (N per "
                "entry); each plan built from its provenance by `autocompress eval`",
        "comparison": "the first plan against each other one, window by window: ppl ratio "
                      "exp(mean difference of the windows' mean next-token losses) and "
                      "difference of the windows' mean KLs to the uncompressed model, each "
                      "with a 95% paired-t interval (scipy.stats.ttest_rel) and windows won",
        "machine": machine()})
    if results.has(args.label):
        print(f"{args.label}: already in paired_eval.json", flush=True)
        return
    run_dir = RUNS / args.label.replace("/", "-")
    run_dir.mkdir(parents=True, exist_ok=True)
    measured = {}
    from autocompress.io_utils import atomic_write_text

    for name, plan in plans.items():
        kept = run_dir / f"{name}.json"
        if kept.is_file():
            measured[name] = json.loads(kept.read_text())
            if measured[name]["windows"] == args.windows:
                continue
        print(f"{args.label}: evaluating {name} ({shown(plan)}) on {args.windows} windows",
              flush=True)
        measured[name] = _measure(plan, args.windows, args.no_kl)
        atomic_write_text(kept, json.dumps(measured[name]))
    first, *others = plans
    entry = {
        "model": json.loads(plans[first].read_text())["model"]["name"],
        "windows": args.windows, "eval_text": eval_protocol(args.windows, WINDOW_LEN),
        "plans": {name: {"plan": shown(plans[name]), "ppl": m["ppl"], "kl": m["kl"],
                         "total_bytes": m["total_bytes"], "wall_s": m["wall_s"]}
                  for name, m in measured.items()},
        "comparisons": [{"a": first, "b": other, **compare(measured[first], measured[other])}
                        for other in others]}
    results.put(args.label, entry)
    for c in entry["comparisons"]:
        low, high = c["ppl_ratio_95"]
        print(f"{args.label}: {c['a']} / {c['b']} perplexity {c['ppl_ratio']:.4f} (95% "
              f"{low:.4f}-{high:.4f}), {c['a']} better on {c['windows_better']} of "
              f"{args.windows} windows", flush=True)
        if "kl_diff" in c:
            low, high = c["kl_diff_95"]
            print(f"{args.label}: KL {c['a']} - {c['b']} {c['kl_diff']:+.5f} (95% {low:+.5f} to "
                  f"{high:+.5f}), {c['a']} lower on {c['kl_windows_better']} of "
                  f"{args.windows} windows", flush=True)


if __name__ == "__main__":
    main()
