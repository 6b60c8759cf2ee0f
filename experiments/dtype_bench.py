"""Computing in float32 or bfloat16 on this CPU (`--dtype`): SmolLM2-135M's forward speed,
perplexity, and how well each precision resolves the KL of compressed plans. Writes
experiments/results/dtype.json (entry "DTYPE/PLAN").

For each dtype the model is loaded in it (`load_model(dtype=...)`), and the uncompressed model
and uniform RTN plans (8-bit and 4-bit, g64) are built in place and evaluated on the test
windows. Every KL is to the float32 uncompressed model (one ReferenceCache, filled first), so
the bfloat16 rows show what a bfloat16 forward adds to each plan's KL: the question behind
`--dtype auto` = float32 on a CPU.

    .venv/bin/python experiments/dtype_bench.py --windows 40
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import EVAL_TEXT, MODEL_LABEL, ResultFile, check_data, eval_protocol, machine  # noqa: E402

PLANS = {"uncompressed": None, "rtn8": dict(bits=8, group_size=64),
         "rtn4-g64": dict(bits=4, group_size=64)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--window-len", type=int, default=512)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    check_data()

    from autocompress.compress.reproduce import built_in_place
    from autocompress.data import load_stream
    from autocompress.evaluate import ReferenceCache, evaluate
    from autocompress.model import load_model
    from autocompress.plan import LayerConfig, uniform_plan

    cpu_flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split() \
        if Path("/proc/cpuinfo").is_file() else []
    bf16_units = [f for f in ("avx512_bf16", "amx_bf16") if f in cpu_flags]
    results = ResultFile("dtype.json", {
        "model": MODEL_LABEL, "eval": eval_protocol(args.windows, args.window_len),
        "plans": "uniform RTN (asymmetric, group 64) at 8 and 4 bits, built in place",
        "reference": "KL to the float32 uncompressed model on the same windows",
        "machine": f"{machine()}; bfloat16 units: {', '.join(bf16_units) or 'none'}"})

    reference_model = load_model("smollm2-135m")
    stream = load_stream(reference_model.tokenizer, str(EVAL_TEXT), "eval")
    windows = stream.windows(args.windows, args.window_len)
    reference = ReferenceCache(reference_model.model, windows).fill(True, desc="float32 reference")
    for dtype in args.dtypes.split(","):
        start = time.perf_counter()
        loaded = reference_model if dtype == "float32" else load_model("smollm2-135m",
                                                                       dtype=dtype)
        load_s = time.perf_counter() - start
        param_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
        for name, fmt in PLANS.items():
            key = f"{dtype}/{name}"
            if results.has(key):
                continue
            start = time.perf_counter()
            if fmt is None:
                model = nullcontext(loaded.model)
            else:
                model = built_in_place(loaded, uniform_plan(loaded.identity, LayerConfig(**fmt)),
                                       progress=False)
            with model as model:
                build_s = time.perf_counter() - start
                start = time.perf_counter()
                result = evaluate(model, windows, reference, desc=key)
                eval_s = time.perf_counter() - start
            results.put(key, {"dtype": dtype, "plan": name, "ppl": result.ppl, "kl": result.kl,
                              "tokens": result.tokens, "build_s": round(build_s, 2),
                              "eval_s": round(eval_s, 2),
                              "tokens_per_s": round(result.tokens / eval_s, 1),
                              "load_s": round(load_s, 2), "param_bytes": param_bytes})
            print(f"{key}: ppl {result.ppl:.3f}, KL {result.kl:.2e}, eval {eval_s:.1f} s "
                  f"({result.tokens / eval_s:.0f} tok/s)")
        del loaded


if __name__ == "__main__":
    main()
