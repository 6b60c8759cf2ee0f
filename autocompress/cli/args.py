"""Argument types and the option groups several sub-commands share; argparse's errors as one
line and exit code 2."""

from __future__ import annotations

import argparse

from .output import console


class _Parser(argparse.ArgumentParser):
    """argparse's errors as the tool's others: one line, exit code 2 (not a usage block)."""

    def error(self, message: str):
        console.print(f"[red]error:[/red] {message} (see `{self.prog} --help`)",
                      highlight=False, soft_wrap=True)
        raise SystemExit(2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _non_negative_int(text: str) -> int:
    value = _positive_int(text) if text.strip() not in ("0", "-0") else 0
    return value


def _bits_list(text: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--bits takes a comma list like 2,3,4,8, not {text!r}") from None


def _group_size(text: str) -> int:
    if text in ("channel", "-1"):
        return -1
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"group size {text!r}: use 32, 64, 128 or channel") from None


def _add_model(p: argparse.ArgumentParser, required_default: str | None = "smollm2-135m") -> None:
    p.add_argument("--model", default=required_default,
                   help="HF directory, .gguf file, or alias (default: %(default)s)")


def _add_memory(p: argparse.ArgumentParser) -> None:
    p.add_argument("--context", type=_positive_int, default=2048, help="KV-cache context (tokens)")
    p.add_argument("--batch", type=_positive_int, default=1, help="sequences decoded at once")


def _add_device(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--device", required=required, default=None,
                   help="device profile: a name from `autocompress devices`, an alias such as "
                        "jetson, or a profile YAML")


def _add_calib(p: argparse.ArgumentParser, windows: int) -> None:
    p.add_argument("--calib-text", default=None,
                   help="calibration text file (default: the embedded pydoc corpus)")
    p.add_argument("--calib-windows", type=_positive_int, default=windows,
                   help="calibration windows (default: %(default)s)")
    p.add_argument("--window-len", type=_positive_int, default=512, help="tokens per window")


def _add_build(p: argparse.ArgumentParser) -> None:
    """apply/eval: calibration as the plan's provenance records it, unless overridden."""
    p.add_argument("--calib-text", default=None,
                   help="calibration text file (default: the one the plan records)")
    p.add_argument("--calib-windows", type=_positive_int, default=None,
                   help="calibration windows (default: as many as the plan records)")
    p.add_argument("--mode", choices=["sequential", "parallel"], default=None,
                   help="GPTQ/Wanda calibration through the compressed prefix (sequential) or "
                        "from the uncompressed model (parallel); default: the plan's")


def _add_recover(p: argparse.ArgumentParser) -> None:
    """apply/search: distillation recovery of the (chosen) plan."""
    p.add_argument("--recover", choices=["kd"], default=None,
                   help="kd: train the quantized layers' scales and the norms towards the "
                        "uncompressed model's next-token distributions on the calibration "
                        "windows (same format and bytes); written beside the plan")
    from ..recovery import KDSettings  # light: no torch before the handlers are in place

    kd = KDSettings()  # the defaults, in one place
    p.add_argument("--kd-steps", type=_positive_int, default=kd.steps,
                   help="recovery steps, one training window each (default %(default)s)")
    p.add_argument("--kd-lr", type=float, default=kd.lr,
                   help="Adam's learning rate: relative on scales, absolute on norms "
                        "(default %(default)s); quartered when the first validation is worse")
    p.add_argument("--kd-lr-backoffs", type=int, default=kd.lr_backoffs, metavar="N",
                   help="at most N times the run starts over from the plan at a quarter of "
                        "the rate (default %(default)s; 0: never)")
    p.add_argument("--kd-plateau-backoffs", type=int, default=kd.plateau_backoffs, metavar="N",
                   help="at most N times a stalled run goes back to its best state at a "
                        "quarter of the rate instead of stopping (default %(default)s)")
    p.add_argument("--kd-schedule", choices=["constant", "cosine"], default=kd.schedule,
                   help="the learning rate over the steps: constant, or cosine-decayed to 0 "
                        "(default %(default)s)")
    p.add_argument("--kd-val-windows", type=_positive_int, default=kd.val_windows,
                   help="calibration-text windows after the training ones, for early stopping "
                        "(default %(default)s)")
    p.add_argument("--kd-train-windows", type=_positive_int, default=kd.train_windows,
                   help="train on the calibration text's first N windows (default "
                        "%(default)s); never the windows the plan's held-out figures came from")


def _add_placement(p: argparse.ArgumentParser, from_plan: bool = False) -> None:
    from ..dtype_names import DTYPE_CHOICES  # not placement's: that imports torch

    p.add_argument("--compute-device", default="auto", metavar="auto|cpu|cuda[:N]",
                   help="where every stage computes (default: auto, the first GPU torch sees, "
                        "else the CPU)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="the dtype the model is loaded and computed in (default: auto, "
                        + ("the one the plan records" if from_plan else
                           "float32 on a CPU, the model's own on a GPU") + ")")


def _add_force(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--force", action="store_true",
                   help=f"write {what} even where --out holds files autocompress did not write "
                        "(only its own files are replaced; nothing else is removed)")
