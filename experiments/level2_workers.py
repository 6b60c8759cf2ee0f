"""Level 2 with 1 and 2 Ray workers on SmolLM2-135M: the same study (same batch of trials
asked at once, so the same trials), one CPU and one torch thread per worker in both runs; the
wall time of level 2, how much of it each worker spent measuring, and whether the trials
agree. Writes experiments/results/level2_workers.json (entry "workers=N" for batches of 2,
"workers=N,batch=B" otherwise; the same trials are compared within one batch size).

The search is the demo's (`make demo`: joint space, 183MB on the jetson profile, fisher
proxy), with --eval-top 0. What its table stage leaves level 2 (the table, the calibration
statistics, the GPTQ and low-rank results it built) is made once and copied to every run, as
a search has it when level 2 starts.

    .venv/bin/python experiments/level2_workers.py --trials 16 --batch 2
    .venv/bin/python experiments/level2_workers.py --ceiling   # entry "ceiling"

The ceiling: what two workers can gain at most on this machine. One process doing 6 forward
passes of SmolLM2 over a 512-token window at one torch thread, timed alone and then two such
processes at once: two workers measure plans at most 2 × (time alone) / (time together) as fast
as one, whatever level 2 does.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ResultFile, machine  # noqa: E402

RUNS = Path(__file__).resolve().parent / "runs" / "level2-workers"


def _forwards(n: int) -> None:
    """n forward passes over one 512-token window at one torch thread; prints the seconds."""
    import torch

    from autocompress.model import load_model

    torch.set_num_threads(1)
    loaded = load_model("smollm2-135m")
    window = torch.randint(0, loaded.model.config.vocab_size, (1, 512),
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loaded.model(window)  # weights paged in, allocator warm
        start = time.perf_counter()
        for _ in range(n):
            loaded.model(window)
    print(time.perf_counter() - start, flush=True)


def ceiling(results, n: int = 6) -> None:
    import subprocess

    def together(k: int) -> list[float]:
        procs = [subprocess.Popen([sys.executable, __file__, "--forwards", str(n)],
                                  stdout=subprocess.PIPE, text=True) for _ in range(k)]
        return [float(p.communicate()[0].split()[-1]) for p in procs]

    alone = together(1)[0]
    pair = together(2)
    record = {"forwards": n, "alone_s": round(alone, 2), "together_s": [round(t, 2) for t in pair],
              "throughput_ratio": round(2 * alone / max(pair), 3)}
    results.put("ceiling", record)
    print(f"ceiling: one process {alone:.1f} s, two at once {pair}: two workers at most "
          f"{record['throughput_ratio']:.2f}x one")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forwards", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ceiling", action="store_true",
                        help="measure only what two processes gain over one on this machine")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2,
                        help="trials asked at once (the same in every run: the same trials)")
    parser.add_argument("--workers", default="1,2")
    args = parser.parse_args()
    if args.forwards:
        return _forwards(args.forwards)

    import ray

    from autocompress.hardware.profile import load_device
    from autocompress.model import load_model
    from autocompress.search.engine import SearchSettings, run_search
    from autocompress.search.space import SearchSpace
    from autocompress.units import parse_size

    results = ResultFile("level2_workers.json", {
        "model": "smollm2-135m (Q4_1 GGUF dequantized to float32)",
        "search": f"joint space, 183MB on jetson, fisher proxy on 8 windows of 512 of the "
                  f"default corpus; level 2: {args.trials} trials (TPE), 2 held-out windows "
                  f"each, parallel calibration; the table stage's statistics and GPTQ / "
                  f"low-rank results on disk when level 2 starts",
        "workers": "Ray actors, one CPU and one torch thread each",
        "machine": machine()})
    if args.ceiling:
        return ceiling(results)
    loaded = load_model("smollm2-135m")
    device, _ = load_device("jetson")
    space = SearchSpace.load("joint")
    # what a search's table stage leaves level 2 (the table, the statistics it took and the
    # GPTQ / low-rank results it built) is the same for every run: made once by a search
    # without levels 2 and 3, copied to each run
    shared = RUNS / "table-stage"
    if not (shared / "statistics").is_dir():
        shutil.rmtree(shared, ignore_errors=True)
        run_search(loaded, space, SearchSettings(budget=parse_size("183MB"), device=device,
                                                 n_holdout=1), out_dir=shared, progress=True)
    trials_of = {}
    for workers in [int(w) for w in args.workers.split(",")]:
        key = f"workers={workers}" + ("" if args.batch == 2 else f",batch={args.batch}")
        out = RUNS / key
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        shutil.copy(shared / "sensitivity.cache.json", out / "sensitivity.cache.json")
        shutil.copytree(shared / "statistics", out / "statistics")
        settings = SearchSettings(budget=parse_size("183MB"), device=device,
                                  trials=args.trials, eval_top=0, num_cpus=max(2, workers),
                                  level2_workers=workers, level2_batch=args.batch)
        start = time.perf_counter()
        result = run_search(loaded, space, settings, out_dir=out, progress=True)
        wall = time.perf_counter() - start
        ray.shutdown()
        trials = sorted(result.trials, key=lambda t: t.number)
        trials_of[workers] = [(t.user_attrs["signature"], t.user_attrs["kl_fast"])
                              for t in trials]
        record = {"workers": workers, "batch": args.batch, "trials": len(trials),
                  "level2_s": round(result.timings["level2_s"], 1), "search_s": round(wall, 1),
                  "signatures": [s for s, _ in trials_of[workers]],
                  "kl_fast": [k for _, k in trials_of[workers]],
                  "worker_use": result.level2_workers}
        first = next(iter(trials_of.values()))
        record["same_trials_as_first"] = trials_of[workers] == first
        results.put(key, record)
        print(f"{key}: level 2 {record['level2_s']} s for {len(trials)} trials; same trials "
              f"as the first run: {record['same_trials_as_first']}")


if __name__ == "__main__":
    main()
