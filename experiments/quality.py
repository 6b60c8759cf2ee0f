"""What each quantizer buys at a fixed format on SmolLM2-135M: uniform plans (every block
linear at the same bits and group, asymmetric) built by each operator and combination, test
perplexity and the time the build took. GPTQ is the baselines' (sequential calibration, 16
windows of wiki.valid, damp 0.01, act-order); ``+clip`` searches each group's grid range
(LayerConfig.clip; importance from the same calibration statistics).
Writes experiments/results/quality.json (resumable: a rerun skips measured rows).

    .venv/bin/python experiments/quality.py [--windows 40] [--only 3g64-gptq+clip,...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB_TEXT, EVAL_TEXT, MODEL_LABEL, ResultFile, check_data, eval_protocol, machine  # noqa: E402

from autocompress.compress.apply import compress_model, uses_calibration  # noqa: E402
from autocompress.data import load_stream  # noqa: E402
from autocompress.evaluate import evaluate  # noqa: E402
from autocompress.model import load_model  # noqa: E402
from autocompress.plan import LayerConfig  # noqa: E402

CALIB_WINDOWS = 16
# (label, method, clip): the operators, cheapest first
OPERATORS = (("rtn", "rtn", False), ("rtn+clip", "rtn", True),
             ("gptq", "gptq", False), ("gptq+clip", "gptq", True))
# the target format first (3-bit g64), then the rest
FORMATS = ((3, 64), (3, 128), (4, 64), (4, 128))


def rows() -> list[tuple[str, LayerConfig]]:
    return [(f"{bits}g{group}-{label}",
             LayerConfig(bits=bits, group_size=group, method=method, clip=clip))
            for bits, group in FORMATS for label, method, clip in OPERATORS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--window-len", type=int, default=512)
    parser.add_argument("--only", default=None, help="comma-separated row names")
    args = parser.parse_args()
    check_data()
    protocol = {
        "model": MODEL_LABEL,
        "eval": eval_protocol(args.windows, args.window_len),
        "format": "uniform: all 210 block linears at the row's bits and group, asymmetric; "
                  "embedding and head as the model has them",
        "calibration": f"sequential, {CALIB_WINDOWS} windows of {args.window_len} tokens of "
                       "wiki.valid.tokens; GPTQ damp 0.01, act-order",
        "machine": machine(),
    }
    results = ResultFile("quality.json", protocol)
    wanted = set(args.only.split(",")) if args.only else None
    loaded = load_model("smollm2-135m")
    windows = load_stream(loaded.tokenizer, EVAL_TEXT, "eval").windows(args.windows,
                                                                         args.window_len)
    calib = load_stream(loaded.tokenizer, CALIB_TEXT, "calib").windows(CALIB_WINDOWS,
                                                                        args.window_len)
    if not results.has("uncompressed") and (wanted is None or "uncompressed" in wanted):
        ppl = evaluate(loaded.model, windows, progress=False).ppl
        results.put("uncompressed", {"ppl": ppl})
        print(f"{'uncompressed':>16}: ppl {ppl:8.2f}", flush=True)
    for name, cfg in rows():
        if results.has(name) or (wanted and name not in wanted):
            continue
        configs = {layer.name: cfg for layer in loaded.layers}
        t = time.perf_counter()
        model = compress_model(loaded, configs, calib if uses_calibration([cfg]) else None,
                               mode="sequential", progress=False)
        build_s = time.perf_counter() - t
        ppl = evaluate(model, windows, progress=False).ppl
        del model
        results.put(name, {"ppl": ppl, "config": cfg.to_dict(), "build_s": build_s})
        print(f"{name:>16}: ppl {ppl:8.2f}  build {build_s:6.1f} s", flush=True)


if __name__ == "__main__":
    main()
