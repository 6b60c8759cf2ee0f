"""How much the searched plan's quality moves with the Optuna sampler's seed alone: the scale
benchmark's SmolLM2 search (the command line's defaults at the bytes of uniform RTN b-bit)
run again with ``--seed N``, each chosen plan measured on the same test windows. The spread is
the noise against which "the search reproduces" is judged (issue 12): the table, level 1 and
the uniform baselines are deterministic; level 2's study is not, across seeds.
Writes experiments/results/seed_spread.json (resumable: one entry per seed).

    .venv/bin/python experiments/seed_spread.py [--bits 3] [--seeds 1,2] [--windows 40]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB_TEXT, REPO, ResultFile, check_data, machine  # noqa: E402
from scale import CLI, ENV, _eval, uniform_total  # noqa: E402

RUNS = REPO / "experiments" / "runs" / "seed_spread"
# the joint space of scale.json's rows (the joint space has had clipped grids since)
SPACE = REPO / "experiments" / "spaces" / "joint_v2.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS of the searches (1 beside another job)")
    args = parser.parse_args()
    check_data()
    from autocompress.model import load_model

    loaded = load_model("smollm2-135m")
    budget = uniform_total(loaded, args.bits)
    del loaded
    results = ResultFile("seed_spread.json", {
        "search": "as scale.json's smollm2 entries: autocompress search with the command "
                  "line's defaults and --seed N, calibration on wiki.valid.tokens",
        "budget": f"the footprint of uniform RTN {args.bits}-bit, group 64, asymmetric: "
                  f"{budget} bytes",
        "eval": f"wiki.test.raw, first {args.windows} non-overlapping windows of 512; plans "
                "built from their provenance by `autocompress eval`",
        "machine": machine()})
    for seed in (int(s) for s in args.seeds.split(",")):
        key = f"smollm2@{args.bits}/seed{seed}"
        if results.has(key):
            continue
        out = RUNS / key.replace("/", "-")
        command = ["search", "--model", "smollm2-135m", "--budget", str(budget),
                   "--calib-text", str(CALIB_TEXT), "--seed", str(seed), "--space", str(SPACE),
                   "--out", str(out)]
        if (out / "study.journal").is_file():
            command.append("--resume")
        elif out.exists():
            shutil.rmtree(out)
        RUNS.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        with (RUNS / f"{key.replace('/', '-')}.log").open("a") as log:
            env = ENV if args.threads is None else {**ENV, "OMP_NUM_THREADS": str(args.threads)}
            subprocess.run(CLI + command, check=True, stdout=log, stderr=subprocess.STDOUT,
                           env=env)
        wall = time.perf_counter() - t
        found = json.loads((out / "search.json").read_text())
        searched = _eval(out / "plan.json", args.windows)
        chosen = next(c for c in found["candidates"] if c["label"] == found["chosen"])
        results.put(key, {"seed": seed, "ppl": searched["ppl"], "kl": searched["kl"],
                          "total_bytes": searched["total_bytes"], "chosen": found["chosen"],
                          "holdout_kl": chosen["measured"]["kl"], "wall_s": round(wall, 1)})
        print(f"{key}: ppl {searched['ppl']:.2f} (held-out KL {chosen['measured']['kl']:.4f}, "
              f"{wall / 60:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
