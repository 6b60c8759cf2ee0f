"""The whole search (levels 1-3) on SmolLM2-135M at the bytes of uniform 2.5, 3, 3.5 and 4 bits,
against uniform RTN, uniform GPTQ, the exact proxy optimum and a llama.cpp-style fixed recipe
at no more bytes; test perplexity of each on wiki.test.raw (40 × 512). Plus one run on
jetson-orin-nano-8gb with a --min-tps constraint. Writes experiments/results/search.json
(resumable per budget); each run's directory (study, Ray experiment, pareto.*) goes to
experiments/runs/ (not committed: level 3 writes each candidate's weights there).

"Uniform b bits" is RTN b-bit at group 64, asymmetric (b + 0.5 bits per weight with its scales
and zeros); 2.5 and 3.5 are the midpoints of the neighbouring uniform totals. Uniform RTN and
GPTQ at a half-bit budget are the largest uniform plans that fit (2 and 3 bits); their
perplexities come from baselines.json (same protocol).

    .venv/bin/python experiments/search.py [--budgets 3,2.5,3.5,4] [--device-run] [--label clip]
        [--rounding signround] [--recover kd [--kd-train-windows N] [--kd-steps N]]

The rows of ``--rounding``/``--recover`` runs hold the plan's held-out KL before and after
each final stage (``stages``); their test perplexity is the final plan's, built as apply
builds it (recovered tensors included).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB_TEXT, EVAL_TEXT, MODEL_LABEL, REPO, ResultFile, check_data, eval_protocol, machine  # noqa: E402
from joint_vs_bits import uniform_total  # noqa: E402

from autocompress.accounting import model_footprint  # noqa: E402
from autocompress.compress.recover import KDSettings  # noqa: E402
from autocompress.compress.reproduce import built_in_place  # noqa: E402
from autocompress.data import load_stream  # noqa: E402
from autocompress.evaluate import evaluate  # noqa: E402
from autocompress.hardware.profile import load_profile  # noqa: E402
from autocompress.model import load_model  # noqa: E402
from autocompress.plan import LayerConfig, Plan  # noqa: E402
from autocompress.search.engine import SearchSettings, run_search  # noqa: E402
from autocompress.search.recipes import best_llama_cpp_recipe  # noqa: E402
from autocompress.search.space import SearchSpace  # noqa: E402

RUNS = Path(__file__).resolve().parent / "runs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="3,2.5,3.5,4")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--eval-top", type=int, default=4)
    parser.add_argument("--device-run", action="store_true",
                        help="also the run on jetson-orin-nano-8gb with --min-tps")
    parser.add_argument("--min-tps", type=float, default=None)
    parser.add_argument("--space", default="joint",
                        help="a bundled space name (autocompress/search_spaces/NAME.yaml) or a "
                             "YAML path; other than joint, keys get a prefix")
    parser.add_argument("--rounding", choices=["signround"], default=None,
                        help="search --rounding: learned rounding of the chosen plan")
    parser.add_argument("--recover", choices=["kd"], default=None,
                        help="search --recover kd: distillation recovery of the chosen plan "
                             "(apply --recover kd's defaults unless the options below)")
    parser.add_argument("--kd-train-windows", type=int, default=KDSettings().train_windows,
                        help="recovery trains on the calibration text's first N windows "
                             "(0: the plan's calibration windows only, as the sr-kd rows)")
    parser.add_argument("--kd-steps", type=int, default=KDSettings().steps)
    parser.add_argument("--kd-lr", type=float, default=KDSettings().lr)
    parser.add_argument("--kd-schedule", default=KDSettings().schedule)
    parser.add_argument("--label", default=None,
                        help="the keys' prefix instead of the space's name (e.g. clip: the "
                             "joint space since it has clipped grids, beside the older rows)")
    args = parser.parse_args()
    check_data()
    settings = dict(calib_text=str(CALIB_TEXT), trials=args.trials, eval_top=args.eval_top,
                    num_cpus=2, rounding=args.rounding,
                    recover=KDSettings(steps=args.kd_steps, lr=args.kd_lr,
                                       schedule=args.kd_schedule,
                                       train_windows=args.kd_train_windows or None,
                                       val_windows=8 if args.kd_train_windows else 4)
                    if args.recover else None)
    if (args.rounding or args.recover) and not args.label:
        parser.error("--rounding and --recover rows need a --label (their keys' prefix)")
    protocol = {
        "model": MODEL_LABEL,
        "search": f"space joint.yaml, proxy fisher on 8 windows of 512 of wiki.valid.tokens; "
                  f"level 2: {args.trials} Optuna trials (TPE), 2 held-out windows each, "
                  f"parallel calibration; level 3: best {args.eval_top} + level 1's candidates "
                  "on 8 held-out windows (Ray Tune, ASHA), each built as apply builds the plan: "
                  "sequential calibration on the 8 windows, GPTQ damp 0.01 act-order; held-out "
                  "windows from the end of wiki.valid.tokens; every plan below built from its "
                  "provenance",
        "eval": eval_protocol(args.windows, 512),
        "machine": machine(),
    }
    results = ResultFile("search.json", protocol)
    baselines = json.loads((REPO / "experiments" / "results" / "baselines.json")
                           .read_text())["entries"]
    loaded = load_model("smollm2-135m")
    eval_windows = load_stream(loaded.tokenizer, EVAL_TEXT, "eval").windows(args.windows, 512)
    space = SearchSpace.load(args.space)
    prefix = f"{args.label}:" if args.label else \
        "" if args.space in ("joint", "default") else f"{Path(args.space).stem}:"

    def test_ppl(plan: Plan, configs=None) -> float:
        """Test perplexity of ``configs`` built as ``plan``'s provenance says (what apply and
        eval build for a user)."""
        if configs is not None:
            plan = Plan(model=loaded.identity, default=LayerConfig(),
                        overrides={n: c.to_dict() for n, c in configs.items()},
                        provenance=plan.provenance)
        with built_in_place(loaded, plan, progress=False) as model:  # recovered tensors too
            return evaluate(model, eval_windows, progress=False).ppl

    def eval_holdout(plan_path: Path) -> dict:
        """`autocompress eval PLAN --holdout`, as a user runs it."""
        done = subprocess.run([str(REPO / ".venv" / "bin" / "autocompress"), "eval",
                               str(plan_path), "--holdout", "--json"], check=True,
                              capture_output=True, text=True)
        return json.loads(done.stdout)

    runs = [(float(b), None) for b in args.budgets.split(",")]
    if args.device_run:
        runs.append((4.0, "jetson-orin-nano-8gb"))
    for bits, device in runs:
        key = prefix + f"{bits:g}" + (f"@{device}" if device else "")
        if results.has(key):
            continue
        budget = uniform_total(loaded, bits)
        extra = {}
        if device:
            extra = dict(device=load_profile(device),
                         max_latency_s=1 / args.min_tps if args.min_tps else None)
        out = RUNS / key.replace("@", "_").replace(":", "_")
        resume = (out / "study.journal").is_file()
        # the sensitivity table does not depend on the budget: build it once, reuse it
        shared = RUNS / f"{prefix.rstrip(':') or 'joint'}.sensitivity.cache.json"
        if shared.is_file() and not (out / "sensitivity.cache.json").is_file():
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy(shared, out / "sensitivity.cache.json")
        t = time.perf_counter()
        found = run_search(loaded, space, SearchSettings(budget=budget, resume=resume, **settings,
                                                         **extra),
                           out_dir=out, progress=False)
        search_s = time.perf_counter() - t
        if not shared.is_file():
            shutil.copy(out / "sensitivity.cache.json", shared)
        proxy = next(c for c in found.candidates if c.label.startswith("proxy optimum"))
        layer_capacity = budget - (found.chosen.footprint.total - found.chosen.footprint.layer_weights)
        recipe = best_llama_cpp_recipe(loaded.layers, loaded.config.num_hidden_layers,
                                       layer_capacity)
        record = {"budget_bytes": budget, "chosen": found.chosen.label,
                  "total_bytes": found.chosen.footprint.total, "search_s": search_s,
                  "timings_s": found.timings, "trials": len(found.trials),
                  "candidates": [c.summary() for c in found.candidates]}
        print(f"{key}: searched in {search_s:.0f} s, chosen {found.chosen.label}", flush=True)
        again = eval_holdout(out / "plan.json")
        reported = found.plan.figures["holdout"]["reported"]
        record["reproduced"] = {"reported_kl": reported["kl"], "eval_kl": again["kl"],
                                "windows": again["windows"],
                                "relative_difference": again["kl"] / reported["kl"] - 1}
        record["searched_ppl"] = test_ppl(found.plan)
        stages = {"rounding": found.plan.figures.get("rounding"),
                  "recovery": None if found.plan.recovery is None else
                  found.plan.recovery.to_dict(),
                  "recovery_tried": found.plan.figures.get("recovery"),
                  "holdout": found.plan.figures["holdout"]}
        if args.rounding or args.recover:  # what each final stage did to the held-out KL
            record["stages"] = stages
        record["proxy_optimum_ppl"] = record["searched_ppl"] if proxy is found.chosen \
            else test_ppl(found.plan, proxy.configs)
        if recipe is not None:
            label, configs = recipe
            record["recipe"] = {"label": label, "ppl": test_ppl(found.plan, configs),
                                "total_bytes": model_footprint(loaded, configs).total}
        whole = math.floor(bits)
        gptq = {l.name: LayerConfig(bits=whole, method="gptq") for l in loaded.layers}
        record["uniform_gptq_act_order"] = {"bits": whole, "ppl": test_ppl(found.plan, gptq)}
        for method in ("rtn", "gptq"):
            row = baselines.get(f"{method}{whole}")
            if row:
                record[f"uniform_{method}"] = {"bits": whole, "ppl": row["ppl"]}
        if device:
            record["device"] = device
            record["min_tps"] = args.min_tps
            record["decode"] = found.chosen.decode.as_dict() if found.chosen.decode else None
        results.put(key, record)
        print(f"{key}: searched {record['searched_ppl']:.2f}, proxy optimum "
              f"{record['proxy_optimum_ppl']:.2f}, recipe "
              f"{record.get('recipe', {}).get('ppl', float('nan')):.2f}", flush=True)


if __name__ == "__main__":
    main()
