"""What each quantizer buys at a fixed format on SmolLM2-135M: uniform plans (every block
linear at the same bits and group, asymmetric) built by each operator and combination, test
perplexity and the time the build took. GPTQ is the baselines' (sequential calibration, 16
windows of wiki.valid, damp 0.01, act-order); ``+clip`` searches each group's grid range
(LayerConfig.clip; importance from the same calibration statistics); ``+awq`` scales input
columns by their calibration activations first (LayerConfig.awq, compress/awq.py; its float16
scales add 2 bytes per input column); ``signround`` learns
each block's rounding and grid ranges on the same windows (compress/signround.py: 200 signed
gradient steps per block, one window each; with ``+awq``, on the AWQ-scaled weight); ``+kd``
then recovers
the built plan by distillation as ``apply --recover kd`` does (compress/recover.py: scales and
norms trained on the 16 calibration windows, early stopping on the 4 after them).
Writes experiments/results/quality.json (resumable: a rerun skips measured rows).

    .venv/bin/python experiments/quality.py [--windows 40] [--only 3g64-gptq+clip,...]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB_TEXT, EVAL_TEXT, MODEL_LABEL, ResultFile, check_data, eval_protocol, machine  # noqa: E402

from autocompress.compress.apply import compress_model, uses_calibration  # noqa: E402
from autocompress.compress.recover import KDSettings, recovered_in_place  # noqa: E402
from autocompress.compress.reproduce import build_recipe  # noqa: E402
from autocompress.compress.signround import SignRoundSettings  # noqa: E402
from autocompress.data import calibration_data  # noqa: E402
from autocompress.provenance import Provenance  # noqa: E402
from autocompress.data import load_stream  # noqa: E402
from autocompress.evaluate import evaluate  # noqa: E402
from autocompress.model import load_model  # noqa: E402
from autocompress.plan import LayerConfig, uniform_plan  # noqa: E402

CALIB_WINDOWS = 16
# (label, the operator's LayerConfig fields): the operators, cheapest first
OPERATORS = (("rtn", {}), ("rtn+clip", {"clip": True}), ("rtn+awq", {"awq": True}),
             ("rtn+awq+clip", {"awq": True, "clip": True}),
             ("gptq", {"method": "gptq"}), ("gptq+clip", {"method": "gptq", "clip": True}),
             ("gptq+awq", {"method": "gptq", "awq": True}),
             ("gptq+awq+clip", {"method": "gptq", "awq": True, "clip": True}),
             ("signround", {"method": "signround"}),
             ("signround+awq", {"method": "signround", "awq": True}))
# the target format first (3-bit g64), then the rest
FORMATS = ((3, 64), (3, 128), (4, 64), (4, 128))


# recovered rows (each also costs the recovery's steps): every operator at the target format,
# and at each other format the best operator that is not learned rounding
KD_ROWS = ("3g64-rtn", "3g64-rtn+clip", "3g64-gptq", "3g64-gptq+clip", "3g64-signround",
           "3g128-gptq+awq+clip", "4g64-gptq+awq+clip", "4g128-gptq+awq+clip")
# apply --recover kd's defaults when these rows were measured (recovery.py measured better ones)
KD = KDSettings(steps=200, lr=1e-3, schedule="constant", train_windows=None, val_windows=4)


def rows() -> list[tuple[str, LayerConfig, bool]]:
    plain = [(f"{bits}g{group}-{label}", LayerConfig(bits=bits, group_size=group, **fields))
             for bits, group in FORMATS for label, fields in OPERATORS]
    out = []
    for bits, group in FORMATS:  # a format's plain rows, then its recovered ones
        mine = [(name, cfg) for name, cfg in plain if name.startswith(f"{bits}g{group}-")]
        out += [(name, cfg, False) for name, cfg in mine]
        out += [(f"{name}+kd", cfg, True) for name, cfg in mine if name in KD_ROWS]
    return out


def recovered_row(loaded, cfg: LayerConfig, windows, window_len: int) -> dict:
    """Build the uniform plan as apply does, recover it, and measure the recovered model."""
    digest = calibration_data(loaded.tokenizer, CALIB_TEXT, CALIB_WINDOWS, 0, window_len).digest
    plan = uniform_plan(loaded.identity, cfg, Provenance(
        calib_text=str(CALIB_TEXT), calib_windows=CALIB_WINDOWS, window_len=window_len,
        calib_digest=digest))
    recipe = build_recipe(loaded, plan)
    t = time.perf_counter()
    with recovered_in_place(loaded, plan, recipe, KD, progress=False) as (model, recovered, _):
        build_s = time.perf_counter() - t
        ppl = evaluate(model, windows, progress=False).ppl
    record = recovered.recovery.to_dict()
    return {"ppl": ppl, "config": cfg.to_dict(), "build_s": build_s,
            "kd": {k: record[k] for k in ("steps", "best_step", "lr", "lr_abandoned",
                                          "train_windows", "val_windows", "kl_before",
                                          "kl_after")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--window-len", type=int, default=512)
    parser.add_argument("--only", default=None, help="comma-separated row names")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (1 beside another job: two would oversubscribe)")
    args = parser.parse_args()
    check_data()
    import torch

    torch.set_num_threads(args.threads)
    protocol = {
        "model": MODEL_LABEL,
        "eval": eval_protocol(args.windows, args.window_len),
        "format": "uniform: all 210 block linears at the row's bits and group, asymmetric; "
                  "embedding and head as the model has them",
        "calibration": f"sequential, {CALIB_WINDOWS} windows of {args.window_len} tokens of "
                       "wiki.valid.tokens; GPTQ damp 0.01, act-order",
        "recovery": f"+kd rows: {KD.steps} steps, Adam lr {KD.lr:g}, validation every "
                    f"{KD.eval_every} steps on the 4 windows after the calibration ones, "
                    f"patience {KD.patience}",
        "machine": machine(),
    }
    results = ResultFile("quality.json", protocol)
    wanted = set(args.only.split(",")) if args.only else None
    loaded = load_model("smollm2-135m")
    windows = load_stream(loaded.tokenizer, EVAL_TEXT, "eval").windows(args.windows,
                                                                         args.window_len)
    calib = load_stream(loaded.tokenizer, CALIB_TEXT, "calib").windows(CALIB_WINDOWS,
                                                                        args.window_len)
    if not results.has("uncompressed"):  # every table's reference row
        ppl = evaluate(loaded.model, windows, progress=False).ppl
        results.put("uncompressed", {"ppl": ppl})
        print(f"{'uncompressed':>16}: ppl {ppl:8.2f}", flush=True)
    for name, cfg, kd in rows():
        if results.has(name) or (wanted and name not in wanted):
            continue
        if kd:
            record = recovered_row(loaded, cfg, windows, args.window_len)
            results.put(name, record)
            print(f"{name:>16}: ppl {record['ppl']:8.2f}  build+recover {record['build_s']:6.1f}"
                  f" s  val KL {record['kd']['kl_before']:.4f} -> {record['kd']['kl_after']:.4f}",
                  flush=True)
            continue
        configs = {layer.name: cfg for layer in loaded.layers}
        t = time.perf_counter()
        model = compress_model(loaded, configs, calib if uses_calibration([cfg]) else None,
                               mode="sequential", progress=False)
        build_s = time.perf_counter() - t
        ppl = evaluate(model, windows, progress=False).ppl
        del model
        record = {"ppl": ppl, "config": cfg.to_dict(), "build_s": build_s}
        if cfg.method == "signround":  # its fixed settings, beside the number they gave
            record["signround"] = dataclasses.asdict(SignRoundSettings())
        results.put(name, record)
        print(f"{name:>16}: ppl {ppl:8.2f}  build {build_s:6.1f} s", flush=True)


if __name__ == "__main__":
    main()
