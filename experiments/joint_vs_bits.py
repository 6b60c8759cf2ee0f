"""Joint space against bits only, at the total bytes of uniform 2.5, 3 and 4 bits.

For each budget: `search` over the joint space (autocompress/search_spaces/joint.yaml: bits ×
group × sparsity × low rank) and over the bits-only space {2, 3, 4, 8} at group 64, both with
the same proxy, each followed by its measured check; the chosen plans are then evaluated on
wiki.test.raw (40 × 512). "Uniform 2.5 bits" is the midpoint of the uniform 2- and 3-bit totals.
Uniform RTN/GPTQ figures at the same bytes are in baselines.json. Writes
experiments/results/joint_vs_bits.json (resumable).

    .venv/bin/python experiments/joint_vs_bits.py [--budgets 3,4,2.5] [--proxy fisher]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB_TEXT, EVAL_TEXT, MODEL_LABEL, ResultFile, check_data, eval_protocol, machine  # noqa: E402

from autocompress.accounting import model_footprint  # noqa: E402
from autocompress.compress.apply import compress_model  # noqa: E402
from autocompress.data import load_stream  # noqa: E402
from autocompress.evaluate import evaluate  # noqa: E402
from autocompress.model import load_model  # noqa: E402
from autocompress.plan import LayerConfig  # noqa: E402
from autocompress.search.engine import SearchSettings, run_search  # noqa: E402
from autocompress.search.space import SearchSpace  # noqa: E402


def uniform_total(loaded, bits: float) -> int:
    if bits == int(bits):
        return model_footprint(loaded, {l.name: LayerConfig(bits=int(bits)) for l in loaded.layers}).total
    low, high = uniform_total(loaded, int(bits)), uniform_total(loaded, int(bits) + 1)
    return round(low + (bits - int(bits)) * (high - low))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budgets", default="3,4,2.5")
    parser.add_argument("--proxy", default="fisher")
    parser.add_argument("--windows", type=int, default=40)
    args = parser.parse_args()
    check_data()
    protocol = {
        "model": MODEL_LABEL,
        "search": f"proxy {args.proxy}, 8 calibration + 4 held-out windows of 512 of wiki.valid.tokens",
        "eval": eval_protocol(args.windows, 512),
        "machine": machine(),
    }
    results = ResultFile(f"joint_vs_bits_{args.proxy}.json", protocol)
    loaded = load_model("smollm2-135m")
    eval_windows = load_stream(loaded.tokenizer, EVAL_TEXT, "eval").windows(args.windows, 512)
    # the search's own calibration windows; statistics from one pass, as its measured check
    calib = load_stream(loaded.tokenizer, CALIB_TEXT, "calib").windows(8, 512)
    spaces = {"joint": SearchSpace.load("joint"),
              "bits": SearchSpace.bits_only([2, 3, 4, 8])}
    for bits in (float(b) for b in args.budgets.split(",")):
        budget = uniform_total(loaded, bits)
        for name, space in spaces.items():
            key = f"{name}@{bits:g}"
            if results.has(key):
                continue
            t = time.perf_counter()
            found = run_search(loaded, space, SearchSettings(budget=budget, calib_text=str(CALIB_TEXT),
                                                             proxy=args.proxy), progress=False)
            search_s = time.perf_counter() - t
            model = compress_model(loaded, found.chosen.configs, calib, mode="parallel",
                                   progress=False)
            ppl = evaluate(model, eval_windows, progress=False).ppl
            results.put(key, {"budget_bytes": budget, "ppl": ppl, "chosen": found.chosen.label,
                              "total_bytes": found.chosen.footprint.total, "search_s": search_s,
                              "candidates": [c.summary() for c in found.candidates]})
            print(f"{key:>10}: ppl {ppl:8.2f}  chosen {found.chosen.label}  ({search_s:.0f} s)",
                  flush=True)


if __name__ == "__main__":
    main()
