"""The README's research studies, each the one `autocompress study` command named beside its
figure. Each study works in experiments/runs/studies/NAME (resumable: a rerun continues it);
its results (JSON, CSV, figures) are copied to experiments/results/studies/NAME when it is done.

    .venv/bin/python experiments/studies.py layers [fronts fronts-speed families proxies] \
        [--qwen-table PATH]

`layers` compares SmolLM2-135M with Qwen2.5-Coder-1.5B and reads the 1.5B's sensitivity table
from the scale benchmark's search (experiments/runs/scale/qwen1.5b@4-solo/search/sensitivity.json,
the same table protocol as the qwen1.5b@4 run the README's figure read, whose directory is
gone), whose Fisher pass takes over an hour here; SmolLM2's is built by the study. `fronts-speed`
is `fronts` with a decode speed each device must reach (--min-tps): between each device's
equal-memory optimum and its fastest plan of that size, so that the limit binds. `proxies`
runs on SmolLM2 and the 1.5B (hours on the 1.5B: three tables and 32 measured plans; it
resumes where it stopped, each table charged all its attempts' time).

A study longer than one machine's life goes on from the repository: stopped (SIGTERM or
Ctrl-C; the study saves what it finished), its resume state (the study's JSON, its output
marker and its sensitivity-table caches, which fill layer by layer; not the calibration
statistics, gigabytes that are taken again) is copied to experiments/results/studies/NAME/
in-progress/, and a run that finds no work directory starts from there. A finished run
removes it.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB_TEXT, REPO, RESULTS, check_data  # noqa: E402

RUNS = REPO / "experiments" / "runs" / "studies"
QWEN_TABLE = [REPO / "experiments" / "runs" / "scale" / "qwen1.5b@4-solo" / "search" /
              "sensitivity.json"]  # --qwen-table changes it


def qwen_gguf() -> str:
    from scale import QWEN_GGUF  # the 1.5B as the scale benchmark loads it

    return str(QWEN_GGUF)


COMMANDS = {
    "layers": lambda: ["study", "layers", "--models", f"smollm2-135m,{qwen_gguf()}",
                       "--tables", f"build,{QWEN_TABLE[0]}", "--calib-text", str(CALIB_TEXT),
                       "--measure-windows", "1", "--measure-every", "2"],
    "fronts": lambda: ["study", "fronts", "--model", "smollm2-135m", "--devices",
                       "jetson-orin-nano-8gb,raspberry-pi-5-8gb,rtx-4090",
                       "--calib-text", str(CALIB_TEXT)],
    "fronts-speed": lambda: COMMANDS["fronts"]() + [
        "--min-tps", "jetson-orin-nano-8gb=178,raspberry-pi-5-8gb=56,rtx-4090=402"],
    # SmolLM2's run is kept: the 1.5B is added to it (a resumed study may add models)
    "proxies": lambda: ["study", "proxies", "--models", f"smollm2-135m,{qwen_gguf()}",
                        "--calib-text", str(CALIB_TEXT)],
    "families": lambda: ["study", "families", "--model", "smollm2-135m", "--bits",
                         "2.5,3,3.5,4", "--calib-text", str(CALIB_TEXT)],
}
KEPT = ("*.json", "*.csv", "figures/*.png")
IN_PROGRESS = "in-progress"
# what a stopped study needs to go on elsewhere (small: its JSON and its tables' caches)
RESUME_STATE = (".autocompress.json", "{study}.json", "*.cache.json", "tables/*.cache.json")


def _copy(source: Path, target: Path, patterns, skip=lambda path: False) -> int:
    copied = 0
    for pattern in patterns:
        for path in source.glob(pattern):
            if skip(path):
                continue
            destination = target / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, destination)
            copied += 1
    return copied


def _replace_dir(target: Path, fill) -> int:
    """``fill`` a new directory beside ``target``, then swap it in: a kill at any point leaves
    the old state or the new one whole, never a half-copied one."""
    tmp, old = target.with_name(f".{target.name}.tmp"), target.with_name(f".{target.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n = fill(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return n


def run(name: str) -> None:
    out = RUNS / name
    args = COMMANDS[name]()
    study = args[1]  # the study's own name: its results file is STUDY.json
    kept = RESULTS / "studies" / name
    state = [p.format(study=study) for p in RESUME_STATE]
    if not (out / f"{study}.json").is_file() and (kept / IN_PROGRESS).is_dir():
        n = _copy(kept / IN_PROGRESS, out, state)
        print(f"going on from {kept / IN_PROGRESS} ({n} files)", flush=True)
    command = [sys.executable, "-m", "autocompress.cli", *args, "--out", str(out)]
    if (out / f"{study}.json").is_file():
        command.append("--resume")
    print(" ".join(command[2:]), flush=True)
    child = subprocess.Popen(command)
    # SIGTERM to this script reaches the study, which saves and stops; then the state is kept
    previous = signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
    try:
        code = child.wait()
    except KeyboardInterrupt:  # the study had the Ctrl-C too
        code = child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code != 0:
        if (out / f"{study}.json").is_file():
            n = _replace_dir(kept / IN_PROGRESS, lambda tmp: _copy(out, tmp, state))
            print(f"{name} stopped (exit {code}); its resume state ({n} files) is in "
                  f"{kept / IN_PROGRESS}: commit it to go on from another checkout", flush=True)
        raise SystemExit(code)
    # the sensitivity caches are inputs, not results
    _copy(out, kept, KEPT, skip=lambda path: path.name.endswith(".cache.json"))
    shutil.rmtree(kept / IN_PROGRESS, ignore_errors=True)
    print(f"copied {name}'s results to {kept}", flush=True)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help=f"studies: {', '.join(COMMANDS)}")
    parser.add_argument("--qwen-table", type=Path, default=QWEN_TABLE[0])
    args = parser.parse_args()
    names = args.names or ["layers"]
    unknown = [n for n in names if n not in COMMANDS]
    if unknown:
        raise SystemExit(f"unknown study {unknown[0]!r}: choose from {', '.join(COMMANDS)}")
    QWEN_TABLE[0] = args.qwen_table.resolve()
    check_data()
    for name in names:
        run(name)


if __name__ == "__main__":
    main()
