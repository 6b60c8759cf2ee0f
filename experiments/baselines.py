"""Baselines on SmolLM2-135M: perplexity and bytes of uniform plans, and of `search`'s plan at
the total bytes of uniform RTN 3-bit.  Writes experiments/results/baselines.json (resumable:
entries already measured under the same protocol are skipped).

    .venv/bin/python experiments/baselines.py [--windows 40] [--only rtn4,gptq3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB_TEXT, EVAL_TEXT, MODEL_LABEL, ResultFile, check_data, eval_protocol, machine  # noqa: E402

from autocompress.accounting import model_footprint  # noqa: E402
from autocompress.compress.weights import GPTQSettings  # noqa: E402
from autocompress.compress.apply import compress_model, uses_calibration  # noqa: E402
from autocompress.data import load_stream  # noqa: E402
from autocompress.evaluate import evaluate  # noqa: E402
from autocompress.model import load_model  # noqa: E402
from autocompress.plan import LayerConfig  # noqa: E402
from autocompress.search.engine import SearchSettings, run_search  # noqa: E402
from autocompress.search.space import SearchSpace  # noqa: E402

UNIFORM = {
    "base": LayerConfig(bits=16),
    "rtn8": LayerConfig(bits=8),
    "rtn4": LayerConfig(bits=4),
    "rtn3": LayerConfig(bits=3),
    "rtn2": LayerConfig(bits=2),
    "gptq4": LayerConfig(bits=4, method="gptq"),
    "gptq3": LayerConfig(bits=3, method="gptq"),
    "gptq2": LayerConfig(bits=2, method="gptq"),
    "wanda50": LayerConfig(bits=16, sparsity=0.5, prune_method="wanda"),
    "wanda2:4": LayerConfig(bits=16, pattern="2:4", sparsity=0.5, prune_method="wanda"),
    "svd0.5": LayerConfig(bits=16, rank_ratio=0.5),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--window-len", type=int, default=512)
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--only", default=None, help="comma list of entries to run")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    check_data()
    protocol = {
        "model": MODEL_LABEL,
        "eval": eval_protocol(args.windows, args.window_len),
        "calibration": f"wiki.valid.tokens, first {args.calib_windows} windows of {args.window_len}"
                       " (GPTQ sequential through the compressed prefix, damp 0.01, without "
                       "act-order; Wanda, whitened SVD)",
        "formats": "group 64 asymmetric unless stated; scales/zeros float16 in the byte count",
        "machine": machine(),
    }
    results = ResultFile("baselines.json", protocol)
    wanted = set(args.only.split(",")) if args.only else None
    progress = not args.no_progress

    t0 = time.perf_counter()
    loaded = load_model("smollm2-135m")
    load_s = time.perf_counter() - t0
    eval_windows = load_stream(loaded.tokenizer, EVAL_TEXT, "eval").windows(args.windows,
                                                                               args.window_len)
    calib_windows = load_stream(loaded.tokenizer, CALIB_TEXT, "calib").windows(args.calib_windows,
                                                                                 args.window_len)
    print(f"model loaded in {load_s:.1f} s; {machine()}", flush=True)

    def measure(key: str, configs: dict[str, LayerConfig], extra: dict | None = None) -> None:
        t = time.perf_counter()
        calib = calib_windows if uses_calibration(configs.values()) else None
        # the table's GPTQ rows predate act-order as the default: kept without it, as measured
        model = compress_model(loaded, configs, calib, progress=progress,
                               gptq=GPTQSettings(act_order=False))
        compress_s = time.perf_counter() - t
        t = time.perf_counter()
        result = evaluate(model, eval_windows, progress=progress, desc=key)
        eval_s = time.perf_counter() - t
        fp = model_footprint(loaded, configs)
        record = {"ppl": result.ppl, "layer_weight_bytes": fp.layer_weights,
                  "weight_bytes": fp.weights, "total_bytes": fp.total,
                  "bits_per_weight": 8 * fp.layer_weights / sum(l.n_params for l in loaded.layers),
                  "compress_s": compress_s, "eval_s": eval_s, **(extra or {})}
        results.put(key, record)
        print(f"{key:>12}: ppl {result.ppl:9.2f}  layers {fp.layer_weights / 1e6:6.1f} MB  "
              f"({record['bits_per_weight']:.2f} b/w)  compress {compress_s:5.1f} s  "
              f"eval {eval_s:5.1f} s", flush=True)

    for key, cfg in UNIFORM.items():
        if (wanted and key not in wanted) or results.has(key):
            continue
        measure(key, {l.name: cfg for l in loaded.layers}, {"config": cfg.to_dict()})

    key = "search@rtn3"
    if (not wanted or key in wanted) and not results.has(key):
        rtn3 = {l.name: LayerConfig(bits=3) for l in loaded.layers}
        budget = model_footprint(loaded, rtn3).total
        t = time.perf_counter()
        found = run_search(loaded, SearchSpace.bits_only([2, 3, 4, 8]),
                           SearchSettings(budget=budget, calib_text=str(CALIB_TEXT)),
                           progress=progress)
        search_s = time.perf_counter() - t
        measure(key, found.chosen.configs, {
            "budget_bytes": budget, "search_s": search_s, "chosen": found.chosen.label,
            "candidates": [c.summary() for c in found.candidates], "timings_s": found.timings,
        })


if __name__ == "__main__":
    main()
