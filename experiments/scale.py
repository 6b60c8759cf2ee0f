"""The same search on SmolLM2-135M and on Qwen2.5-Coder-1.5B-Instruct, at the bytes of uniform
3-bit and 4-bit: wall time per stage, peak memory of the whole process tree, and the searched
plan's test perplexity against uniform RTN and GPTQ at the same bytes. Writes
experiments/results/scale.json (entry MODEL@BITS; a rerun skips finished entries).

The search is the command line's, with its defaults (joint space, Fisher proxy on 8
calibration windows of wiki.valid.tokens, 40 level-2 trials on 2 held-out windows, level 3 on
the best 4 and level 1's candidates on 8 held-out windows), run as a user runs it:

    autocompress search --model M --budget B --calib-text wiki.valid.tokens --out DIR

its memory sampled over its process tree, Ray's processes included (peak_memory.py's
TreeSampler: PSS summed, every 0.25 s). B is the footprint of uniform RTN b-bit (group 64,
asymmetric) at the command line's context (2048) and batch (1). The baselines are
`autocompress plan --bits b [--method gptq]` plans at those bytes, and every plan's test
perplexity is `autocompress eval PLAN --eval-text wiki.test.raw --windows N --json` (the plan
built from its provenance, as a user would build it).

The 1.5B model is the Q4_K_M GGUF assembled by experiments/assemble_qwen.py (--qwen PATH). Its
dequantization to a float32 checkpoint is cached once, before the search, and timed apart.

    .venv/bin/python experiments/scale.py [--models smollm2,qwen1.5b] [--bits 3,4]
        [--qwen PATH] [--windows smollm2=40,qwen1.5b=10] [--tag solo] [--table-from KEY]

``--tag T`` runs the same search again as entry MODEL@BITS/T beside the first (e.g. a run with
the machine to itself, for clean stage times), in runs/scale/MODEL@BITS-T.

``--table-from KEY`` starts a new entry from the sensitivity table and calibration statistics
of entry KEY's run (same model, calibration and space: the budget enters only at level 1), as a
user searching a second budget reuses the first one's table. The search still checks the
table's cache key and rebuilds it when the inputs differ; the entry records ``table_from`` and
the table time measured there only when its log says the cached rows were reused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB_TEXT, EVAL_TEXT, REPO, ResultFile, check_data, machine  # noqa: E402
from joint_vs_bits import uniform_total  # noqa: E402
from peak_memory import INTERVAL_S, TreeSampler  # noqa: E402

from autocompress.model import load_model, non_layer_params  # noqa: E402

RUNS = Path(__file__).resolve().parent / "runs" / "scale"
CHECKPOINT_S = 30  # how often a running attempt's time and peaks are written
# the package of this checkout (a frozen worktree runs its own code, whatever is installed),
# run as the `autocompress` command; Ray's workers inherit PYTHONPATH
CLI = [sys.executable, "-m", "autocompress.cli"]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
QWEN_GGUF = Path("/work/qwen/qwen2.5-coder-1.5b-q4_k_m.gguf")  # experiments/assemble_qwen.py
MODELS = {
    "smollm2": ("smollm2-135m", "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32)"),
    "qwen1.5b": (None, "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF dequantized to float32)"),
}


def _run(args: list[str]) -> str:
    done = subprocess.run(CLI + args, check=True, capture_output=True, text=True, env=ENV)
    return done.stdout


def _eval(plan: Path, windows: int, no_kl: bool = False) -> dict:
    """``autocompress eval --json`` of ``plan`` on the first ``windows`` test windows (of the
    command's default 512 tokens)."""
    return json.loads(_run(["eval", str(plan), "--eval-text", str(EVAL_TEXT),
                            "--windows", str(windows), "--json"] + (["--no-kl"] if no_kl else [])))


def _attempts(out: Path) -> list[dict]:
    """The attempts of an unfinished search in ``out`` (none: start afresh)."""
    path = out / "attempts.json"
    if not path.is_file() or not (out / "search").is_dir():
        return []
    return json.loads(path.read_text())


def _finished(out: Path, attempts: list[dict]) -> bool:
    """The search's last attempt ended it (its search.json written): a rerun of this script
    goes on to the evaluations, so a resumed search adds no stage time that it did not take."""
    return bool(attempts) and attempts[-1]["exit_code"] == 0 \
        and (out / "search" / "search.json").is_file()


def _attempt(key: str, out: Path, command: list[str], number: int) -> dict:
    """Run the search once (to its end or an interrupt), its process tree sampled. The
    attempt is written to attempts.json at its start, every CHECKPOINT_S while it runs and at
    its end, so a rerun resumes with the time and memory it took counted even when this script
    was killed with it (a record without an exit code: killed)."""
    from autocompress.io_utils import atomic_write_text

    log = out / ("search.log" if number == 0 else f"search.{number + 1}.log")
    earlier = _attempts(out) if number else []
    start = time.time()
    proc = subprocess.Popen(CLI + command, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=ENV)

    def write(sampler, code) -> dict:
        record = {"started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start)),
                  "wall_s": round(time.time() - start, 1), "exit_code": code,
                  "peak_pss_bytes": sampler.peak_pss, "peak_rss_sum_bytes": sampler.peak_rss_sum,
                  "largest_process_rss_bytes": sampler.largest_process,
                  "processes": sampler.most_processes, "log": log.name,
                  # what measuring cost: the sampler's CPU time, and how often it read PSS
                  "sampler_cpu_s": round(sampler.cpu_s, 1), "sampler_ticks": sampler.ticks,
                  "sampler_pss_reads": sampler.pss_reads}
        atomic_write_text(out / "attempts.json", json.dumps(earlier + [record], indent=1))
        return record

    code = None
    with TreeSampler(proc.pid) as sampler:
        try:
            while code is None:
                write(sampler, None)
                try:
                    code = proc.wait(timeout=CHECKPOINT_S)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            if code is None:  # this script interrupted: the search stops with it (it resumes)
                proc.terminate()
                code = proc.wait()
            record = write(sampler, code)
    return record


def _run_dir(key: str) -> Path:
    """Where entry ``key`` (MODEL@BITS or MODEL@BITS/TAG) runs its search."""
    return RUNS / key.replace("/", "-")


def _seed_table(out: Path, source_key: str) -> None:
    """Start ``out``'s search from entry ``source_key``'s table cache and statistics (the
    statistics hard-linked: gigabytes on a 1.5B model, and only ever replaced, never edited)."""
    source = _run_dir(source_key) / "search"
    cache = source / "sensitivity.cache.json"
    if not cache.is_file():
        raise SystemExit(f"--table-from {source_key}: no table cache at {cache}; run that "
                         "entry first")
    (out / "search").mkdir(parents=True)
    shutil.copy2(cache, out / "search" / cache.name)
    if (source / "statistics").is_dir():
        shutil.copytree(source / "statistics", out / "search" / "statistics",
                        copy_function=os.link)
    (out / "table_from.txt").write_text(source_key)  # read back when the entry is written


def _table_reuse(out: Path) -> dict:
    """What the entry says about a table it took from another run: the source and the table
    time measured there, if the search's first attempt did reuse it (its log says so)."""
    if not (out / "table_from.txt").is_file():
        return {}
    source_key = (out / "table_from.txt").read_text().strip()
    first_log = (out / "search.log").read_text(errors="replace")
    if "cached rows of" not in first_log or "rebuilding it" in first_log:
        return {}
    timings = json.loads((_run_dir(source_key) / "search" / "timings.json").read_text())
    return {"table_from": source_key, "table_from_sensitivity_s": timings["sensitivity_s"]}


class _Peaks:
    """The peaks over all attempts, read like a TreeSampler."""

    def __init__(self, attempts: list[dict]):
        self.peak_pss = max(a["peak_pss_bytes"] for a in attempts)
        self.peak_rss_sum = max(a["peak_rss_sum_bytes"] for a in attempts)
        self.largest_process = max(a["largest_process_rss_bytes"] for a in attempts)
        self.most_processes = max(a["processes"] for a in attempts)
        # attempts sampled before the sampler timed itself have no figure: then none is given
        cpu = [a.get("sampler_cpu_s") for a in attempts]
        self.cpu_s = None if None in cpu else round(sum(cpu), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,qwen1.5b")
    parser.add_argument("--bits", default="3,4")
    parser.add_argument("--qwen", type=Path, default=QWEN_GGUF,
                        help="the assembled Qwen2.5-Coder-1.5B GGUF")
    parser.add_argument("--windows", default="smollm2=40,qwen1.5b=10",
                        help="test windows of 512 per model")
    parser.add_argument("--tag", default="",
                        help="entries MODEL@BITS/TAG: the same search run again beside the first")
    parser.add_argument("--table-from", metavar="KEY",
                        help="start new entries from entry KEY's sensitivity table and "
                             "statistics (e.g. qwen1.5b@4/solo)")
    args = parser.parse_args()
    check_data()
    windows = dict((k, int(v)) for k, v in (item.split("=") for item in args.windows.split(",")))
    results = ResultFile("scale.json", {
        "search": "autocompress search with the command line's defaults: joint space, fisher "
                  "proxy on 8 windows of 512 of wiki.valid.tokens, 40 level-2 trials (TPE) on "
                  "2 held-out windows, level 3 (Ray Tune, ASHA) on the best 4 and level 1's "
                  "candidates on 8 held-out windows, sequential calibration; context 2048, "
                  "batch 1",
        "budget": "the footprint of uniform RTN b-bit, group 64, asymmetric (weights, KV "
                  "cache at 2048 tokens, workspace)",
        "memory": f"PSS summed over the search and its descendants (Ray) every {INTERVAL_S} s, "
                  "peak of the sum",
        "eval": "wiki.test.raw, first N non-overlapping windows of 512 (N per entry); plans "
                "built from their provenance by `autocompress eval`",
        "machine": machine()})
    for model_key in args.models.split(","):
        spec, label = MODELS[model_key]
        spec = spec or str(args.qwen)
        t = time.perf_counter()
        loaded = load_model(spec)  # converts a GGUF once (cached); not part of the search
        convert_s = time.perf_counter() - t
        n_params = sum(l.n_params for l in loaded.layers) + non_layer_params(loaded)
        budgets = {bits: uniform_total(loaded, int(bits)) for bits in args.bits.split(",")}
        del loaded
        for bits, budget in budgets.items():
            key = f"{model_key}@{bits}" + (f"/{args.tag}" if args.tag else "")
            if results.has(key):
                continue
            out = _run_dir(key)
            command = ["search", "--model", spec, "--budget", str(budget),
                       "--calib-text", str(CALIB_TEXT), "--out", str(out / "search")]
            attempts = _attempts(out)
            if _finished(out, attempts):  # stopped in the evaluations after it: not rerun
                print(f"{key}: the search finished; evaluating its plan", flush=True)
                command.append("--resume")
            elif attempts:  # an interrupted search of this entry: continued, as a user would
                print(f"{key}: resuming after {len(attempts)} attempt(s)", flush=True)
                command.append("--resume")
                attempts.append(_attempt(key, out, command, len(attempts)))
            else:
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True)
                if args.table_from:  # a seeded --out holds files the search did not write
                    _seed_table(out, args.table_from)
                    command.append("--force")
                attempts.append(_attempt(key, out, command, len(attempts)))
            if attempts[-1]["exit_code"] != 0:
                raise SystemExit(f"{key}: the search exited {attempts[-1]['exit_code']}; see "
                                 f"{out / 'search.log'} (rerun to resume it)")
            wall = sum(a["wall_s"] for a in attempts)
            sampler = _Peaks(attempts)
            found = json.loads((out / "search" / "search.json").read_text())
            n = windows[model_key]
            searched = _eval(out / "search" / "plan.json", n)
            baselines = {}
            for method in ("rtn", "gptq"):
                plan = out / f"{method}{bits}.json"
                _run(["plan", "--model", spec, "--bits", bits, "--method", method,
                      "--calib-text", str(CALIB_TEXT), "--out", str(plan)])
                baselines[method] = _eval(plan, n)
            chosen = next(c for c in found["candidates"] if c["label"] == found["chosen"])
            record = {
                "model": label,
                "command": "autocompress " + " ".join(command).replace(str(REPO) + "/", "")
                .replace(str(REPO.parent), ".."),
                "params": n_params, "bf16_weight_bytes": 2 * n_params,
                "budget_bytes": budget, "convert_s": round(convert_s, 1),
                "wall_s": round(wall, 1), "attempts": len(attempts),
                "timings_s": found["timings_s"], **_table_reuse(out),
                "peak_pss_bytes": sampler.peak_pss, "peak_rss_sum_bytes": sampler.peak_rss_sum,
                "largest_process_rss_bytes": sampler.largest_process,
                "processes": sampler.most_processes, "sampler_cpu_s": sampler.cpu_s,
                "chosen": found["chosen"], "chosen_total_bytes": chosen["total_bytes"],
                "eval_windows": n,
                "searched": {k: searched[k] for k in ("ppl", "kl", "total_bytes")},
                "uniform_rtn": {k: baselines["rtn"][k] for k in ("ppl", "kl", "total_bytes")},
                "uniform_gptq": {k: baselines["gptq"][k] for k in ("ppl", "kl", "total_bytes")},
            }
            results.put(key, record)
            print(f"{key}: {wall / 60:.1f} min, peak {sampler.peak_pss / 2**30:.2f} GiB; ppl "
                  f"searched {searched['ppl']:.2f}, RTN {baselines['rtn']['ppl']:.2f}, GPTQ "
                  f"{baselines['gptq']['ppl']:.2f}", flush=True)


if __name__ == "__main__":
    main()
