"""What makes GPTQ work (or not) on SmolLM2-135M: calibration mode, text, damping, act-order,
each changed alone from the baselines' GPTQ (sequential, 16 windows of wiki.valid, damp 0.01),
whose figure and RTN's at the same format stay in baselines.json.
Writes experiments/results/gptq_study_<bits>bit.json (resumable).

    .venv/bin/python experiments/gptq_study.py [--bits 3] [--windows 40]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB_TEXT, EVAL_TEXT, MODEL_LABEL, ResultFile, check_data, eval_protocol, machine  # noqa: E402

from autocompress.compress.apply import compress_model  # noqa: E402
from autocompress.compress.weights import GPTQSettings  # noqa: E402
from autocompress.data import load_stream  # noqa: E402
from autocompress.evaluate import evaluate  # noqa: E402
from autocompress.model import load_model  # noqa: E402
from autocompress.plan import LayerConfig  # noqa: E402

# name -> (calibration mode, calibration windows, calibration text, GPTQ settings)
# (sequential, 16 wiki windows, damp 0.01) is the baselines' GPTQ entry; each variant changes one knob
# (measured before act-order became GPTQSettings' default: the baseline is without it)
BASE = GPTQSettings(act_order=False)
VARIANTS = {
    "parallel-16": ("parallel", 16, "wiki", BASE),
    "sequential-16-damp0.1": ("sequential", 16, "wiki", GPTQSettings(damp=0.1, act_order=False)),
    "sequential-16-actorder": ("sequential", 16, "wiki", GPTQSettings(act_order=True)),
    "sequential-16-pydoc": ("sequential", 16, "pydoc", BASE),
    "parallel-8-actorder": ("parallel", 8, "wiki", GPTQSettings(act_order=True)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--window-len", type=int, default=512)
    parser.add_argument("--only", default=None)
    args = parser.parse_args()
    check_data()
    protocol = {
        "model": MODEL_LABEL,
        "eval": eval_protocol(args.windows, args.window_len),
        "format": f"{args.bits}-bit, group 64, asymmetric, all 210 block linears",
        "machine": machine(),
    }
    results = ResultFile(f"gptq_study_{args.bits}bit.json", protocol)
    wanted = set(args.only.split(",")) if args.only else None
    loaded = load_model("smollm2-135m")
    eval_windows = load_stream(loaded.tokenizer, EVAL_TEXT, "eval").windows(args.windows,
                                                                               args.window_len)
    streams = {"wiki": load_stream(loaded.tokenizer, CALIB_TEXT, "calib"),
               "pydoc": load_stream(loaded.tokenizer, None, "calib")}

    cfg = LayerConfig(bits=args.bits, method="gptq")
    for name, (mode, n_windows, text, settings) in VARIANTS.items():
        if results.has(name) or (wanted and name not in wanted):
            continue
        calib = streams[text].windows(n_windows, args.window_len)
        t = time.perf_counter()
        model = compress_model(loaded, {l.name: cfg for l in loaded.layers}, calib, mode=mode,
                               gptq=settings, progress=False)
        compress_s = time.perf_counter() - t
        ppl = evaluate(model, eval_windows, progress=False).ppl
        results.put(name, {"ppl": ppl, "mode": mode, "calib_windows": n_windows,
                           "calib_text": text, "gptq": asdict(settings), "compress_s": compress_s})
        print(f"{name:>24}: ppl {ppl:8.2f}  compress {compress_s:6.1f} s", flush=True)


if __name__ == "__main__":
    main()
