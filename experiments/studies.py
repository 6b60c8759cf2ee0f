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
"""

from __future__ import annotations

import shutil
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


def run(name: str) -> None:
    out = RUNS / name
    args = COMMANDS[name]()
    study = args[1]  # the study's own name: its results file is STUDY.json
    command = [sys.executable, "-m", "autocompress.cli", *args, "--out", str(out)]
    if (out / f"{study}.json").is_file():
        command.append("--resume")
    print(" ".join(command[2:]), flush=True)
    subprocess.run(command, check=True)
    kept = RESULTS / "studies" / name
    for pattern in KEPT:
        for path in out.glob(pattern):
            if path.name.endswith(".cache.json"):  # the sensitivity cache: input, not a result
                continue
            target = kept / path.relative_to(out)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
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
