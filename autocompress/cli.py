"""Command line: one sub-command per verb. Parses, calls the library, prints. No logic here."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from rich.console import Console

from .errors import AutocompressError
from .interrupts import Terminated, ignore_further_signals, sigterm_seen, signals_unwind
from .peak_memory import describe as describe_peak, peak_rss_bytes

console = Console(stderr=True)  # tables and logs on stderr; stdout carries --json output


class _Parser(argparse.ArgumentParser):
    """argparse's errors as the tool's others: one line, exit code 2 (not a usage block)."""

    def error(self, message: str):
        console.print(f"[red]error:[/red] {message} (see `{self.prog} --help`)",
                      highlight=False, soft_wrap=True)
        raise SystemExit(2)


def _log(message: str) -> None:
    """A library's progress line, on stderr, one message on one line."""
    console.print(message, highlight=False, soft_wrap=True)


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
        raise argparse.ArgumentTypeError(f"--bits takes a comma list like 2,3,4,8, not {text!r}") from None


def _group_size(text: str) -> int:
    if text in ("channel", "-1"):
        return -1
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size {text!r}: use 32, 64, 128 or channel") from None


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
    from .recovery import KDSettings  # light: no torch before the handlers are in place

    kd = KDSettings()  # the defaults, in one place
    p.add_argument("--kd-steps", type=_positive_int, default=kd.steps,
                   help="recovery steps, one training window each (default %(default)s)")
    p.add_argument("--kd-lr", type=float, default=kd.lr,
                   help="Adam's learning rate: relative on scales, absolute on norms "
                        "(default %(default)s); quartered when the first validation is worse")
    p.add_argument("--kd-lr-backoffs", type=int, default=kd.lr_backoffs, metavar="N",
                   help="at most N times the run starts over from the plan at a quarter of "
                        "the rate (default %(default)s; 0: never)")
    p.add_argument("--kd-schedule", choices=["constant", "cosine"], default=kd.schedule,
                   help="the learning rate over the steps: constant, or cosine-decayed to 0 "
                        "(default %(default)s)")
    p.add_argument("--kd-val-windows", type=_positive_int, default=kd.val_windows,
                   help="calibration-text windows after the training ones, for early stopping "
                        "(default %(default)s)")
    p.add_argument("--kd-train-windows", type=_positive_int, default=kd.train_windows,
                   help="train on the calibration text's first N windows (default "
                        "%(default)s); never the windows the plan's held-out figures came from")


def _kd_settings(args):
    from .recovery import KDSettings

    return KDSettings(steps=args.kd_steps, lr=args.kd_lr, val_windows=args.kd_val_windows,
                      train_windows=args.kd_train_windows, schedule=args.kd_schedule,
                      lr_backoffs=args.kd_lr_backoffs) \
        if args.recover else None


def _add_placement(p: argparse.ArgumentParser, from_plan: bool = False) -> None:
    from .dtype_names import DTYPE_CHOICES  # not placement's: that imports torch

    p.add_argument("--compute-device", default="auto", metavar="auto|cpu|cuda[:N]",
                   help="where every stage computes (default: auto, the first GPU torch sees, "
                        "else the CPU)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="the dtype the model is loaded and computed in (default: auto, "
                        + ("the one the plan records" if from_plan else
                           "float32 on a CPU, the model's own on a GPU") + ")")


def _load(args, dtype: str | None = None):
    """The model on --compute-device in --dtype (or ``dtype``), said on the terminal."""
    from .model import load_model

    loaded = load_model(args.model, dtype=dtype or args.dtype, device=args.compute_device)
    _say_placement(loaded)
    return loaded


def _say_placement(loaded) -> None:
    """Where the work runs, said when it is not this tool's long-standing CPU float32."""
    if loaded.placement.describe() != "cpu, float32":
        _log(f"computing on {loaded.placement.describe()}")


def _add_force(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--force", action="store_true",
                   help=f"write {what} even where --out holds files autocompress did not write "
                        "(only its own files are replaced; nothing else is removed)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="autocompress",
        description="Find per-layer compression plans for LLMs under a memory budget.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("layers", help="list the compressible linear layers of a model")
    _add_model(p)

    p = sub.add_parser("plan", help="write a uniform plan (a baseline)")
    p.add_argument("--config", default=None,
                   help="a model's config.json instead of --model (no weights needed)")
    _add_model(p)
    p.add_argument("--bits", type=int, default=None, help="native format's bits (or --gguf)")
    p.add_argument("--group-size", type=_group_size, default=64)
    p.add_argument("--sym", action="store_true", help="symmetric grid (default asymmetric)")
    p.add_argument("--method", choices=["rtn", "gptq", "signround"], default="rtn")
    p.add_argument("--gguf", default=None, metavar="TYPE",
                   help="a GGUF type for every block linear instead of --bits (q4_k, q8_0, "
                        "iq4_xs, ...), made by llama.cpp's quantizer")
    p.add_argument("--recipe", default=None, metavar="NAME",
                   help="one of llama.cpp's recipes (Q4_K_M, Q3_K_S, IQ4_XS, ...): the type "
                        "llama-quantize gives each tensor, as a plan")
    p.add_argument("--pure", action="store_true",
                   help="with --recipe: its default type everywhere (llama-quantize --pure)")
    p.add_argument("--imatrix", action="store_true",
                   help="with --gguf or --recipe: weight llama.cpp's rounding by the mean x² of each "
                        "input column over the calibration windows (as llama-imatrix)")
    p.add_argument("--token-embedding-type", default=None, metavar="TYPE",
                   help="GGUF type of the token embedding (default float16), as llama-quantize's "
                        "flag of that name")
    p.add_argument("--output-tensor-type", default=None, metavar="TYPE",
                   help="GGUF type of an untied output head (default float16)")
    p.add_argument("--sparsity", type=float, default=0.0)
    p.add_argument("--pattern", choices=["unstructured", "2:4"], default="unstructured")
    p.add_argument("--prune-method", choices=["magnitude", "wanda"], default="wanda")
    p.add_argument("--rank-ratio", type=float, default=1.0)
    p.add_argument("--clip", action="store_true",
                   help="clipped grids: each group's range shrunk to the least error weighted "
                        "by the input's mean x² (--bits formats; same bytes)")
    p.add_argument("--awq", action="store_true",
                   help="activation-aware scaling: input columns scaled by their calibration "
                        "activations before quantizing (--bits formats, rtn or gptq; 2 bytes "
                        "per input column)")
    p.add_argument("--out", required=True, help="plan JSON to write")
    _add_force(p, "the plan")
    p.add_argument("--mode", choices=["sequential", "parallel"], default="sequential",
                   help="how GPTQ/Wanda will be calibrated (recorded in the plan)")
    _add_calib(p, 16)
    _add_memory(p)

    p = sub.add_parser("apply", help="write the compressed model (safetensors + plan)")
    p.add_argument("plan")
    _add_model(p, None)
    p.add_argument("--out", required=True,
                   help="output directory (an earlier apply output there is replaced whole)")
    _add_force(p, "the model")
    _add_placement(p, from_plan=True)
    p.add_argument("--packed", action="store_true",
                   help="write bit-packed low-bit storage (runtime format) instead of float16")
    _add_build(p)
    _add_recover(p)

    p = sub.add_parser("export", help="write the plan's model as a file an engine runs (GGUF)")
    p.add_argument("plan")
    _add_model(p, None)
    p.add_argument("--format", choices=["gguf"], required=True,
                   help="gguf: llama.cpp's file, every tensor in its plan type")
    p.add_argument("--out", required=True, help="file to write (e.g. model.gguf)")
    _add_force(p, "the file")
    _add_build(p)
    _add_placement(p, from_plan=True)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    p = sub.add_parser("eval", help="perplexity and KL of a plan on evaluation text")
    p.add_argument("plan")
    _add_model(p, None)
    p.add_argument("--eval-text", default=None,
                   help="evaluation text file (default: the embedded pydoc corpus, eval part)")
    p.add_argument("--windows", type=_positive_int, default=None,
                   help="evaluation windows (default: 40, or as many as the text holds)")
    p.add_argument("--holdout", action="store_true",
                   help="evaluate on the held-out windows the search measured the plan on "
                        "(and compare with the KL it reported)")
    p.add_argument("--window-len", type=_positive_int, default=512,
                   help="tokens per evaluation window")
    p.add_argument("--no-kl", action="store_true", help="skip KL (halves the time)")
    p.add_argument("--engine", choices=["torch", "llamacpp"], default="torch",
                   help="what runs the model: torch (the plan built as the search measured "
                        "it) or llamacpp (a GGUF file in llama.cpp, --gguf)")
    p.add_argument("--gguf", default=None,
                   help="with --engine llamacpp: the GGUF file to run (KL against the "
                        "uncompressed model on the same windows)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    _add_device(p, required=False)
    _add_build(p)
    _add_memory(p)
    _add_placement(p, from_plan=True)

    p = sub.add_parser("sensitivity", help="build a sensitivity table (layers x options) and a heat map")
    _add_model(p)
    p.add_argument("--proxy", default="fisher", help="fisher | hessian | hutchinson | measured")
    p.add_argument("--space", default="joint",
                   help="search space: a bundled name (joint, bits, gguf) or a YAML path")
    p.add_argument("--out", required=True, help="table JSON to write (the PNG goes beside it)")
    _add_force(p, "the table")
    _add_calib(p, 8)
    _add_placement(p)

    p = sub.add_parser("search", help="search a per-layer plan under a memory budget")
    _add_model(p)
    p.add_argument("--budget", default=None,
                   help="whole footprint: 4GB, 3.5GiB, 80MB, 62000000 (default with --device: "
                        "the memory the device lets a model use)")
    _add_device(p, required=False)
    p.add_argument("--speed-profile", default=None,
                   help="a llama.cpp speed profile (profile --engine llamacpp): --latency and "
                        "--min-tps then predict llama.cpp's decode of GGUF plans from it")
    p.add_argument("--latency", default=None,
                   help="most predicted time per decoded token on --device, e.g. 30ms")
    p.add_argument("--min-tps", type=float, default=None,
                   help="fewest predicted decoded tokens/s on --device (batch 1)")
    p.add_argument("--bits", type=_bits_list, default=None,
                   help="RTN bit widths to choose from, e.g. 2,3,4,8, instead of a space")
    p.add_argument("--group-size", type=_group_size, default=64)
    p.add_argument("--space", default=None,
                   help="search space: a bundled name (joint, bits, gguf) or a YAML path "
                        "(default: joint, the space of bits, groups, GPTQ, sparsity and low "
                        "rank; with --bits: RTN at those bit widths)")
    p.add_argument("--mode", choices=["sequential", "parallel"], default="sequential",
                   help="how the measured candidates are calibrated, as apply will build the "
                        "plan (recorded in it): through the compressed prefix (sequential, "
                        "better, slower) or from the uncompressed model")
    p.add_argument("--out", required=True, help="output directory (plan.json, tables)")
    p.add_argument("--export", choices=["gguf", "none"], default=None,
                   help="write the chosen plan as OUT/model.gguf and check it in llama.cpp "
                        "(default: gguf when every option of the space is a GGUF type)")
    p.add_argument("--proxy", default="fisher", help="fisher | hessian | hutchinson | measured")
    p.add_argument("--holdout-windows", type=_positive_int, default=4,
                   help="held-out windows to measure candidates on in process (--eval-top 0)")
    p.add_argument("--trials", type=_non_negative_int, default=40,
                   help="level 2: Optuna trials, each plan measured at low fidelity (0 skips)")
    p.add_argument("--sampler", default="tpe", choices=["tpe", "nsga2", "gp", "random"],
                   help="level 2's Optuna sampler")
    p.add_argument("--fast-windows", type=_positive_int, default=2,
                   help="held-out windows per level-2 trial")
    p.add_argument("--eval-top", type=_non_negative_int, default=4,
                   help="level 3: the best level-2 plans evaluated as Ray Tune trials with ASHA, "
                        "besides level 1's (0: measure level 1's in process instead)")
    p.add_argument("--eval-windows", type=_positive_int, default=8,
                   help="held-out windows per level-3 candidate")
    p.add_argument("--storage", default=None,
                   help="Optuna storage: an RDB URL (sqlite:///study.db) or a journal file "
                        "(default: OUT/study.journal; optuna-dashboard opens either)")
    p.add_argument("--resume", action="store_true",
                   help="continue the study and the Ray Tune experiment left in --out")
    _add_force(p, "the search (an earlier search in --out is replaced)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join for level 3 (default: a local Ray in process)")
    p.add_argument("--num-cpus", type=_positive_int, default=None,
                   help="CPUs of the local Ray and torch threads of level 3 (default: all); "
                        "with --address, CPUs per level-3 trial (default 1), as many trials "
                        "at once as the cluster's CPUs hold")
    p.add_argument("--level2-workers", type=_non_negative_int, default=0,
                   help="Ray workers measuring level 2's trials side by side, one CPU and one "
                        "torch thread each (default 0: in this process)")
    p.add_argument("--level2-batch", type=_positive_int, default=None,
                   help="level-2 trials asked at once (default: --level2-workers, at least 1); "
                        "the same batch asks the same trials with any number of workers")
    p.add_argument("--seed", type=int, default=0, help="the Optuna sampler's seed")
    p.add_argument("--rounding", choices=["signround"], default=None,
                   help="signround: the chosen plan's RTN/GPTQ layers get learned rounding "
                        "(same formats and bytes), kept where it lowers the held-out KL")
    _add_recover(p)
    _add_calib(p, 8)
    _add_memory(p)
    _add_placement(p)
    p = sub.add_parser("study", help="a research study, one command: fronts (quality x memory "
                                     "x predicted speed on several devices), families "
                                     "(quantization, pruning, low rank, joint at equal bytes), "
                                     "layers (which layers tolerate a format, across models), "
                                     "proxies (each proxy's fidelity per option family)")
    p.add_argument("name", choices=["fronts", "families", "layers", "proxies"],
                   help="the study")
    _add_model(p)
    p.add_argument("--models", default=None,
                   help="layers, proxies: the models, comma-separated (default: --model)")
    p.add_argument("--proxies", default="fisher,hessian,hutchinson",
                   help="proxies: the proxies compared (default: %(default)s)")
    p.add_argument("--plans-per-family", type=_positive_int, default=8,
                   help="proxies: random plans measured per option family (default: %(default)s)")
    p.add_argument("--tables", default=None,
                   help="layers: a sensitivity table per model (e.g. a search's "
                        "sensitivity.json), comma-separated, 'build' to build one")
    p.add_argument("--layer-bits", type=int, default=3,
                   help="layers: the RTN format profiled, bits (default: %(default)s)")
    p.add_argument("--layer-group", type=int, default=64,
                   help="layers: the RTN format profiled, group size (default: %(default)s)")
    p.add_argument("--measure-windows", type=int, default=2,
                   help="layers: held-out windows each layer alone is measured on (0: proxy "
                        "only; default: %(default)s)")
    p.add_argument("--measure-every", type=_positive_int, default=1,
                   help="layers: measure the layers of every k-th block (default: all)")
    p.add_argument("--devices", default=None,
                   help="fronts: device profiles to compare, comma-separated (at least two), "
                        "e.g. jetson-orin-nano-8gb,raspberry-pi-5-8gb,rtx-4090")
    p.add_argument("--min-tps", default=None, metavar="DEVICE=TPS,...",
                   help="fronts: the decode speed (tokens/s, the device's latency model) each "
                        "named device's plans must reach, e.g. raspberry-pi-5-8gb=50")
    p.add_argument("--bits", default="2.5,3,3.5,4",
                   help="families: budgets as the bytes of uniform b-bit (default: %(default)s)")
    p.add_argument("--families", default=None,
                   help="families: which, comma-separated (default: quantization, "
                        "'pruning, 16-bit', 'pruning, 8-bit', 'low rank, 16-bit', joint)")
    p.add_argument("--space", default="joint",
                   help="search space: a bundled name (joint, bits, gguf) or a YAML path")
    p.add_argument("--points", type=_positive_int, default=6, help="plans per device front")
    p.add_argument("--eval-windows", type=_positive_int, default=4,
                   help="held-out windows each plan is measured on")
    p.add_argument("--context", type=_positive_int, default=2048,
                   help="context of the memory and speed predictions")
    p.add_argument("--proxy", default="fisher", help="fisher | hessian | hutchinson | measured")
    p.add_argument("--out", required=True, help="directory for the study's results and figures")
    p.add_argument("--resume", action="store_true",
                   help="continue the study left in --out (plans measured are kept)")
    _add_force(p, "the study (an earlier study in --out is replaced)")
    _add_calib(p, 8)
    _add_placement(p)

    p = sub.add_parser("devices", help="list the device profiles with memory and bandwidth")

    p = sub.add_parser("profile", help="measure this machine and write a device profile")
    p.add_argument("--out", required=True, help="profile YAML to write, e.g. my-box.yaml (then --device my-box.yaml)")
    p.add_argument("--name", default=None, help="profile name (default: the file's stem)")
    _add_force(p, "the profile")
    _add_model(p)
    p.add_argument("--config", default=None,
                   help="measure at the layer shapes of this config.json instead of --model's")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads")
    p.add_argument("--formats", default=None,
                   help="formats to measure, e.g. f16,q4,q8 (default: every runtime format: "
                        "f16, q2-q6, q8, q4+2:4, q4+sparse)")
    p.add_argument("--engine", choices=["autocompress", "llamacpp"], default="autocompress",
                   help="llamacpp: llama.cpp's decode of --model's GGUF files, one per type "
                        "(--formats: GGUF types), for predicting mixed files")

    p = sub.add_parser("estimate",
                       help="predict a plan's memory and decode speed on a device from a config")
    p.add_argument("plan", help="plan JSON")
    _add_device(p, required=False)
    p.add_argument("--speed-profile", default=None,
                   help="a llama.cpp speed profile (profile --engine llamacpp): predict "
                        "llama.cpp's decode of the plan's GGUF on the machine it measured "
                        "(with or instead of --device)")
    p.add_argument("--config", default=None,
                   help="model config.json (default: the plan's model's, without loading weights)")
    p.add_argument("--model", default=None, help="model whose config to use (default: the plan's)")
    _add_memory(p)
    p.add_argument("--kv-bits", type=int, choices=[4, 8, 16], default=16, help="KV-cache bits")
    p.add_argument("--head-format", default=None,
                   help="format of embeddings and head: f16, bf16, f32, q4, q8 ... "
                        "(default: the device's float dtype)")
    p.add_argument("--prompt-tokens", type=_positive_int, default=512,
                   help="prompt length for the prefill estimate")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return parser


def run() -> int:
    """The ``autocompress`` program: main() on sys.argv, then signals are ignored while Python
    exits (see interrupts.signals_unwind)."""
    return main(None, exiting=True)


def main(argv: list[str] | None = None, exiting: bool = False) -> int:
    # the handlers first: a SIGTERM from the first moment ends with the one line and 143, not
    # the default action's silent death (the fault drill met it while the parser was built)
    with signals_unwind(then_ignore=exiting):
        args = None
        try:
            try:
                args = build_parser().parse_args(argv)
            except SystemExit as exc:  # a usage error (one line, said by _Parser) or --help
                return exc.code if isinstance(exc.code, int) else 2
            from .peak_memory import bound_heap

            bound_heap()
            return COMMANDS[args.command](args)
        except AutocompressError as exc:
            console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            return exc.exit_code
        except KeyboardInterrupt as exc:
            return _interrupted(args, exc)


def _interrupted(args, exc: KeyboardInterrupt) -> int:
    """One line, whatever was running; a second signal while saying it is ignored."""
    ignore_further_signals()
    terminated = sigterm_seen() or isinstance(exc, Terminated)
    what = "terminated" if terminated else "interrupted"
    again = (" (rerun with --resume to continue)"
             if args is not None and args.command == "search" else "")
    # a progress bar may hold the cursor mid-line: the line is cleared (terminal) or ended
    sys.stderr.write("\r\x1b[2K" if console.is_terminal else "\n")
    console.print(f"{what}; files already written are kept, nothing is half-written{again}",
                  highlight=False, soft_wrap=True)
    return 143 if terminated else 130


# -- commands -----------------------------------------------------------------------------------

def cmd_layers(args) -> int:
    from rich.table import Table

    from .model import load_model

    loaded = load_model(args.model)
    table = Table(title=f"{loaded.name}: {len(loaded.layers)} compressible linears")
    for col in ("name", "kind", "block", "out", "in"):
        table.add_column(col)
    for layer in loaded.layers + ([loaded.head] if loaded.head else []):
        table.add_row(layer.name, layer.kind, "" if layer.block is None else str(layer.block),
                      str(layer.out_features), str(layer.in_features))
    Console().print(table)
    return 0


def cmd_plan(args) -> int:
    from .accounting import model_footprint
    from .plan import LayerConfig, uniform_plan
    from .outputs import check_out_file, json_with_keys
    from .report import footprint_table, print_tables

    check_out_file(args.out, force=args.force, what="plan",
                   inputs=[args.config, args.model, args.calib_text],
                   is_ours=json_with_keys("schema_version", "model", "default"))
    if args.recipe:
        return _recipe_plan(args)
    config = _plan_config(args)
    tables = {name: LayerConfig(gguf=value) for name, value in
              (("model.embed_tokens", args.token_embedding_type),
               ("lm_head", args.output_tensor_type)) if value is not None}
    if tables and args.config:
        raise AutocompressError("--token-embedding-type/--output-tensor-type need --model (the "
                                "embedding's shape and tying come from the weights)")
    tokenizer = None
    if args.config:  # a model too big for this machine: its config is enough for a plan
        from .hardware.architecture import read_config
        from .hardware.memory import memory_breakdown
        from .model import model_identity

        arch = read_config(args.config)
        name, identity = arch.name, model_identity(arch.name, arch.layers)
        identity.source = str(args.config)
        fp = memory_breakdown(arch, [config] * len(arch.layers), args.context, args.batch)
    else:
        from .model import load_model

        loaded = load_model(args.model)
        name, identity, tokenizer = loaded.name, loaded.identity, loaded.tokenizer
        if "lm_head" in tables and "lm_head" not in {t.name for t in loaded.tables}:
            raise AutocompressError("this model's output head is tied to its token embedding "
                                    "(one tensor): use --token-embedding-type")
        fp = model_footprint(loaded, {**{l.name: config for l in loaded.layers}, **tables},
                             args.context, args.batch)
    provenance = _plan_provenance(args, config, tokenizer)
    plan = dataclasses.replace(uniform_plan(identity, config, provenance),  # checks the tables
                               overrides={name: cfg.to_dict() for name, cfg in tables.items()})
    plan.figures.update({"footprint": fp.as_dict(), "context": args.context, "batch": args.batch})
    plan.save(args.out)
    print_tables(footprint_table(fp, title=f"{config.short()} on {name}"), console=console)
    if not args.config:
        _note_gguf_fallbacks(plan, loaded)
    console.print(f"wrote {args.out}")
    return 0


def _recipe_plan(args) -> int:
    """plan --recipe: llama.cpp's recipe as a plan (the per-tensor types of llama-quantize)."""
    from .accounting import model_footprint
    from .gguf_recipes import RECIPES, recipe_plan
    from .model import load_model
    from .plan import LayerConfig
    from .report import footprint_table, print_tables

    given = [flag for flag, value in (("--bits", args.bits), ("--gguf", args.gguf),
                                      ("--config", args.config),
                                      ("--token-embedding-type", args.token_embedding_type),
                                      ("--output-tensor-type", args.output_tensor_type),
                                      ("--clip", args.clip or None),
                                      ("--awq", args.awq or None))
             if value is not None]
    if given:
        raise AutocompressError(f"--recipe sets every tensor's type itself: leave out "
                                f"{', '.join(given)} (a recipe needs --model)")
    if args.recipe.upper() not in RECIPES:  # before the model loads
        raise AutocompressError(f"unknown llama.cpp recipe {args.recipe!r}: choose from "
                                f"{', '.join(RECIPES)}")
    loaded = load_model(args.model)
    weighting = LayerConfig(gguf="q8_0", method="imatrix" if args.imatrix else "rtn")
    plan = recipe_plan(loaded, args.recipe, imatrix=args.imatrix, pure=args.pure,
                       provenance=_plan_provenance(args, weighting, loaded.tokenizer))
    fp = model_footprint(loaded, plan.resolve_model(loaded), args.context, args.batch)
    plan.figures.update({"footprint": fp.as_dict(), "context": args.context, "batch": args.batch})
    plan.save(args.out)
    print_tables(footprint_table(fp, title=f"{plan.figures['label']} on {loaded.name}"),
                 console=console)
    console.print(f"wrote {args.out}")
    return 0


def _note_gguf_fallbacks(plan, loaded) -> None:
    from .gguf_types import fallback_notes

    entries = [(info.name, cfg.gguf, *info.shape) for info in loaded.layers + loaded.tables
               for cfg in [plan.config_for(info.name)] if cfg.is_gguf]
    for line in fallback_notes(entries):
        console.print(f"note: {line}", highlight=False)


def _plan_config(args):
    from .plan import LayerConfig

    if (args.bits is None) == (args.gguf is None):
        raise AutocompressError("give the format: --bits N (native) or --gguf TYPE (llama.cpp)")
    if args.gguf is not None:
        if args.method != "rtn" or args.sym or args.group_size != 64 or args.clip or args.awq:
            raise AutocompressError("--gguf types carry their own grid: --method, --sym, "
                                    "--group-size, --clip and --awq apply to --bits formats "
                                    "(use --imatrix)")
        return LayerConfig(gguf=args.gguf, method="imatrix" if args.imatrix else "rtn",
                           sparsity=args.sparsity, pattern=args.pattern,
                           prune_method=args.prune_method, rank_ratio=args.rank_ratio)
    if args.imatrix or args.pure:
        raise AutocompressError(f"{'--imatrix' if args.imatrix else '--pure'} goes with --gguf "
                                "or --recipe (llama.cpp's quantizer)")
    return LayerConfig(bits=args.bits, group_size=args.group_size, sym=args.sym,
                       method=args.method, sparsity=args.sparsity, pattern=args.pattern,
                       prune_method=args.prune_method, rank_ratio=args.rank_ratio,
                       clip=args.clip, awq=args.awq)


def _plan_provenance(args, config, tokenizer):
    """What `plan` records about calibration: the text, windows and mode apply will use."""
    from .compress.apply import uses_calibration
    from .data import calibration_data
    from .provenance import Provenance

    calib_text = str(Path(args.calib_text).resolve()) if args.calib_text else None
    digest = None
    if tokenizer is not None and uses_calibration([config]):
        digest = calibration_data(tokenizer, calib_text, args.calib_windows, 0,
                                  args.window_len).digest
        _warn_embedded_corpus(calib_text)
    return Provenance(calib_text=calib_text, calib_windows=args.calib_windows,
                      window_len=args.window_len, calib_digest=digest, mode=args.mode)


def _warn_embedded_corpus(calib_text) -> None:
    if calib_text is None:
        console.print("note: calibration runs on the embedded pydoc corpus (GPTQ, Wanda, low "
                      "rank, clipped grids); prose close to your use gives better plans: pass "
                      "--calib-text FILE", highlight=False)


def _load_for_plan(args):
    from .model import load_model
    from .plan import Plan

    plan = Plan.load(args.plan)
    plan.recovered_tensors()  # a missing or altered file is said before the model loads
    # --dtype auto reproduces the plan: the dtype its weights and figures were computed in
    recorded = plan.provenance.compute_dtype if plan.provenance else "float32"
    loaded = load_model(args.model or plan.model.source or plan.model.name,
                        dtype=recorded if args.dtype == "auto" else args.dtype,
                        device=args.compute_device)
    _say_placement(loaded)
    plan.check_model(loaded.identity)
    plan.check_override_names((layer.name for layer in loaded.layers),
                              (table.name for table in loaded.tables))
    return plan, loaded


def _build_recipe(args, loaded, plan):
    """The plan's provenance (or the flags that override it), said on the terminal."""
    from .compress.reproduce import build_recipe
    from .provenance import BuildOverrides

    recipe = build_recipe(loaded, plan, BuildOverrides(
        calib_text=args.calib_text, calib_windows=args.calib_windows, mode=args.mode,
        compute_dtype=loaded.placement.dtype_name))
    if plan.recovery is not None and recipe.provenance != plan.provenance:
        raise AutocompressError("this plan's recovered tensors were trained on the build its "
                                "provenance records: build it as recorded (no --calib-text, "
                                "--calib-windows, --mode or --dtype), or recover again")
    for note in recipe.notes:
        _log(note)
    if recipe.calib is not None:
        _warn_embedded_corpus(recipe.provenance.calib_text)
    return recipe


def cmd_apply(args) -> int:
    from .compress.reproduce import built_in_place
    from .export.safetensors import save_compressed
    from .outputs import check_out_dir

    inputs = [args.plan, args.model, args.calib_text]
    check_out_dir(args.out, "apply", force=args.force, inputs=inputs)  # before any work
    plan, loaded = _load_for_plan(args)
    check_out_dir(args.out, "apply", force=args.force, inputs=[loaded.source])
    recipe = _build_recipe(args, loaded, plan)
    built = plan if recipe.provenance == plan.provenance else \
        dataclasses.replace(plan, provenance=recipe.provenance)  # the output says how it was made
    if args.recover:
        return _apply_recovered(args, loaded, built, recipe)
    if args.packed:
        from .runtime.convert import apply_packed
        from .units import format_size

        sizes = apply_packed(loaded, built, args.out, recipe.calib, mode=recipe.mode,
                             gptq=recipe.gptq, force=args.force, log=_log)
        console.print(f"wrote packed model to {args.out}: block linears "
                      f"{format_size(sizes['packed_layer_bytes'])} "
                      f"(plan accounting {format_size(sizes['accounted_layer_bytes'])})",
                      highlight=False)
        return 0
    with built_in_place(loaded, built, recipe) as model:
        save_compressed(model, loaded, built, args.out, force=args.force, log=_log)
    console.print(f"wrote compressed model to {args.out}")
    _log(describe_peak({"peak_rss_bytes": peak_rss_bytes()}))
    return 0


def _apply_recovered(args, loaded, plan, recipe) -> int:
    """apply --recover kd: recover the plan in place (resumable from a checkpoint beside
    --out), then write the model with the recovered tensors and the plan that names them."""
    import tempfile

    from .compress.recover import recovered_in_place
    from .export.safetensors import save_compressed

    settings = _kd_settings(args)
    checkpoint = Path(f"{Path(args.out).resolve()}.kd-checkpoint.pt")
    if checkpoint.exists():
        _log(f"resuming recovery from {checkpoint}")
    with recovered_in_place(loaded, plan, recipe, settings, checkpoint=checkpoint,
                            progress=True) as (model, recovered, data):
        console.print(recovered.recovery.describe(), highlight=False)
        if not args.packed:
            save_compressed(model, loaded, recovered, args.out, force=args.force, log=_log,
                            extra={recovered.recovery.tensors: data})
    if args.packed:  # packed from the restored model, as any apply --packed, scales put in
        from .runtime.convert import apply_packed

        with tempfile.TemporaryDirectory(prefix="autocompress-recovered-") as tmp:
            (Path(tmp) / recovered.recovery.tensors).write_bytes(data)
            recovered.directory = Path(tmp)
            apply_packed(loaded, recovered, args.out, recipe.calib, mode=recipe.mode,
                         gptq=recipe.gptq, force=args.force, log=_log)
    checkpoint.unlink(missing_ok=True)
    console.print(f"wrote {'packed ' if args.packed else ''}compressed model to {args.out}")
    _log(describe_peak({"peak_rss_bytes": peak_rss_bytes()}))
    return 0


def cmd_export(args) -> int:
    from .export.gguf import check_exportable, export_gguf, is_our_gguf, source_gguf
    from .outputs import check_out_file
    from .units import format_size

    inputs = [args.plan, args.model, args.calib_text]
    check_out_file(args.out, force=args.force, what="GGUF export", inputs=inputs,
                   is_ours=is_our_gguf)  # before any work
    plan, loaded = _load_for_plan(args)
    check_exportable(plan, loaded)
    source = source_gguf(loaded)
    check_out_file(args.out, force=args.force, what="GGUF export",
                   inputs=[p for p in (source, loaded.source) if p], is_ours=is_our_gguf)
    recipe = _build_recipe(args, loaded, plan)
    result = export_gguf(loaded, plan, args.out, recipe, progress=not args.json)
    types = ", ".join(f"{n} {t}" for t, n in sorted(result.types.items(), key=lambda kv: -kv[1]))
    if args.json:
        print(json.dumps({"gguf": str(result.path), "file_bytes": result.file_bytes,
                          "planned_bytes": result.planned_bytes, "types": result.types,
                          "source": str(source or loaded.source),
                          "peak_rss_bytes": peak_rss_bytes()}))
    else:
        origin = source.name if source else f"the config and tokenizer in {loaded.source}"
        console.print(f"wrote {args.out}: {format_size(result.file_bytes)} ({types}); "
                      f"metadata and tokenizer from {origin}", highlight=False)
        _log(describe_peak({"peak_rss_bytes": peak_rss_bytes()}))
    return 0


def _search_gguf(plan_path: str) -> str | None:
    """The model.gguf a GGUF search wrote beside its plan.json, if it is there."""
    from .plan import Plan
    from .search.deploy import GGUF_FILE

    try:
        figures = Plan.load(plan_path).figures
    except AutocompressError:
        return None  # the plan's own error is said where it is loaded
    path = Path(plan_path).parent / GGUF_FILE
    if isinstance(figures.get("llamacpp"), dict) and path.is_file():
        _log(f"running {path} (the GGUF this search wrote beside its plan)")
        return str(path)
    return None


def cmd_eval(args) -> int:
    from .accounting import model_footprint
    from .compress.reproduce import built_in_place
    from .data import load_stream
    from .evaluate import ReferenceCache, evaluate
    from .report import footprint_table, print_tables

    if args.engine == "llamacpp":  # checked before the model loads
        from .engines.llamacpp import library

        if not args.gguf:
            args.gguf = _search_gguf(args.plan)
        if not args.gguf:
            raise AutocompressError("--engine llamacpp runs a GGUF file: give --gguf FILE")
        if not Path(args.gguf).is_file():
            raise AutocompressError(f"GGUF file {args.gguf!r} not found")
        library()
    elif args.gguf:
        raise AutocompressError("--gguf is for --engine llamacpp")
    profile = None
    if args.device:  # a bad device fails before the long evaluation, not after
        from .hardware.profile import load_profile

        profile = load_profile(args.device)
    plan, loaded = _load_for_plan(args)
    if args.holdout:
        from .search.holdout import holdout_windows

        if args.eval_text or args.windows:
            raise AutocompressError("--holdout evaluates on the windows the plan records; leave "
                                    "out --eval-text and --windows")
        windows, source, reported = holdout_windows(loaded.tokenizer, plan)
        window_len = windows.shape[1]
    else:
        stream = load_stream(loaded.tokenizer, args.eval_text, "eval")
        n_windows = args.windows or min(40, stream.max_windows(args.window_len))
        windows, source, reported = stream.windows(n_windows, args.window_len), stream.source, None
        window_len = args.window_len
    engine_note = None
    if args.engine == "llamacpp":
        from .engines.llamacpp import LlamaCppEngine

        with LlamaCppEngine(args.gguf, n_ctx=window_len) as engine:
            if engine.n_vocab != loaded.model.config.vocab_size:
                raise AutocompressError(
                    f"{args.gguf} has {engine.n_vocab} tokens, the plan's model "
                    f"{loaded.model.config.vocab_size}: it is another model's GGUF")
            result = evaluate(engine, windows, None if args.no_kl else loaded.model)
        recipe, engine_note = None, f" (llama.cpp, {args.gguf})"
    else:
        recipe = _build_recipe(args, loaded, plan)
        # the reference first: the plan is then built into the model itself, not a copy
        reference = None if args.no_kl else ReferenceCache(loaded.model, windows).fill(True)
        with built_in_place(loaded, plan, recipe, codes=True) as model:
            result = evaluate(model, windows, reference)
    configs = plan.resolve_model(loaded)
    fp = model_footprint(loaded, configs, args.context, args.batch)
    record = {**result.as_dict(), "weight_bytes": fp.weights, "total_bytes": fp.total,
              "layer_weight_bytes": fp.layer_weights, "eval_text": source,
              "window_len": window_len, "engine": args.engine,
              "provenance": recipe.provenance.to_dict() if recipe else None,
              "compute": loaded.placement.describe(), "peak_rss_bytes": peak_rss_bytes()}
    if args.engine == "llamacpp":
        record["gguf"] = str(Path(args.gguf).resolve())
        record["gguf_bytes"] = Path(args.gguf).stat().st_size
    if reported is not None:
        record["search_reported"] = reported
    device = None
    if profile is not None:
        from .hardware.architecture import Architecture
        from .hardware.estimate import estimate_plan

        device = estimate_plan(plan, Architecture.from_loaded(loaded), profile,
                               args.context, args.batch)
        record["device"] = device.as_dict()
    if args.json:
        print(json.dumps(record))
    else:
        print_tables(footprint_table(fp), console=console)
        if device is not None:
            _print_device_estimate(device)
        kl = "" if result.kl is None else f", KL {result.kl:.4f} nats/token"
        Console().print(f"perplexity {result.ppl:.3f}{kl} on {result.windows} windows of "
                        f"{window_len} tokens of {source}{engine_note or ''}", highlight=False)
        _log(describe_peak(record))
        if reported is not None and reported.get("kl") is not None:
            Console().print(f"the search reported KL {reported['kl']:.4f}, perplexity "
                            f"{reported['ppl']:.3f} on these windows", highlight=False)
    return 0


def _device_and_latency(args):
    """(profile or None, what an alias chose or None, most seconds per token or None) from
    --device/--latency/--min-tps."""
    from .units import parse_duration

    if (args.latency or args.min_tps) and not (args.device or
                                               getattr(args, "speed_profile", None)):
        raise AutocompressError("--latency and --min-tps need --device (the speed is predicted "
                                "on a device profile: `autocompress devices` lists them) or "
                                "--speed-profile (llama.cpp's, from profile --engine llamacpp)")
    if args.min_tps is not None and args.min_tps <= 0:
        raise AutocompressError(f"--min-tps must be positive, got {args.min_tps}")
    limits = [s for s in (args.latency and parse_duration(args.latency),
                          args.min_tps and 1.0 / args.min_tps) if s]
    device = note = None
    if args.device:
        from .hardware.profile import load_device

        device, note = load_device(args.device)
    return device, note, (min(limits) if limits else None)


def cmd_search(args) -> int:
    from .report import (
        candidates_table,
        decode_table,
        footprint_table,
        kinds_table,
        print_tables,
    )
    from .outputs import check_search_dir, prepare_search_dir
    from .search.engine import SearchSettings, run_search
    from .search.optuna_level import check_storage
    from .sensitivity.build import make_proxy
    from .search.space import SearchSpace
    from .units import parse_size

    budget = parse_size(args.budget) if args.budget else None
    device, note, max_latency = _device_and_latency(args)
    if budget is None and device is None:
        raise AutocompressError("give --budget (e.g. 4GB), --device, or both")
    if args.bits and args.space:
        raise AutocompressError("give --space or --bits, not both")
    space = SearchSpace.bits_only(args.bits, group_size=args.group_size) if args.bits else \
        SearchSpace.load(args.space or "joint")
    make_proxy(args.proxy)  # a typo is one line before any work
    speed = None
    if args.speed_profile:
        from .hardware.llamacpp_speed import LlamaCppSpeed

        speed = LlamaCppSpeed.load(args.speed_profile)
    inputs = [args.model, args.calib_text, args.space, args.device, args.speed_profile]
    state = check_search_dir(args.out, resume=args.resume, force=args.force, inputs=inputs)
    check_storage(args.storage, args.out)
    if args.address:
        from .search.tune_level import check_cluster_address

        check_cluster_address(args.address)  # said now, not after the sensitivity table
    export = args.export or ("gguf" if space.all_gguf else "none")
    recover = _kd_settings(args)
    if recover is not None and space.all_gguf:
        raise AutocompressError("--recover kd trains the scales of RTN/GPTQ layers; a GGUF "
                                "space has none (llama.cpp's types keep their own scales)")
    if args.rounding and (space.all_gguf or args.mode != "sequential"):
        raise AutocompressError("--rounding signround learns the rounding of RTN/GPTQ layers "
                                "block by block: it needs a native space and --mode sequential")
    if export == "gguf":
        from .engines.llamacpp import library

        library()  # llama.cpp missing or mismatched: said before any work
    loaded = _load(args)
    if export == "gguf":
        from .export.gguf import source_gguf

        source_gguf(loaded)  # what the export cannot write (an architecture...): said now
    prepare_search_dir(args.out, state, resume=args.resume,
                       log=_log)
    settings = SearchSettings(budget=budget, context=args.context, batch=args.batch,
                              n_calib=args.calib_windows, n_holdout=args.holdout_windows,
                              window_len=args.window_len, calib_text=args.calib_text,
                              proxy=args.proxy, device=device, max_latency_s=max_latency,
                              speed_profile=speed, mode=args.mode,
                              trials=args.trials, eval_top=args.eval_top,
                              fast_windows=args.fast_windows, eval_windows=args.eval_windows,
                              sampler=args.sampler, storage=args.storage, seed=args.seed,
                              resume=args.resume, num_cpus=args.num_cpus, address=args.address,
                              level2_workers=args.level2_workers,
                              level2_batch=args.level2_batch, recover=recover,
                              rounding=args.rounding)
    result = run_search(loaded, space, settings, out_dir=args.out,
                        log=_log)
    chosen = result.chosen
    tables = [kinds_table(loaded.layers, chosen.configs),
              footprint_table(chosen.footprint, settings.effective_budget()),
              candidates_table(result.candidates, chosen.label)]
    if chosen.decode is not None:
        tables.append(decode_table(chosen.decode, device.name if device and not speed else
                                   f"llama.cpp ({speed.machine}, {speed.threads} threads)"))
    print_tables(*tables, console=console)
    if export == "gguf":
        from .search.deploy import GGUF_FILE, export_and_confirm, exports_gguf
        from .units import format_size

        if not exports_gguf(result.plan, loaded):
            raise AutocompressError("--export gguf: the chosen plan has layers in formats with "
                                    "no GGUF type; search a GGUF space (--space gguf)")
        check = export_and_confirm(loaded, result.plan, args.out)
        torch_kl = chosen.measured["kl"]
        _log(f"llama.cpp runs {GGUF_FILE} ({format_size(check['file_bytes'])}) at KL "
             f"{check['kl']:.4f}, perplexity {check['ppl']:.2f} on the {check['windows']} "
             f"held-out windows (torch measured KL {torch_kl:.4f})")
    if note:  # said at the end, where it is read (and never before an error line)
        _log(note)
    wrote = "plan.json" + (", model.gguf" if export == "gguf" else "")
    console.print(f"chosen: {chosen.label}; wrote {wrote} in {args.out} and the "
                  "trade-offs (pareto.json, pareto.csv, pareto.png)", highlight=False)
    _log(describe_peak(result.memory))
    return 0


def cmd_sensitivity(args) -> int:
    from .data import calibration_data
    from .search.space import SearchSpace
    from .sensitivity.build import build_table, make_proxy
    from .sensitivity.heatmap import save_heatmap

    out, png = _sensitivity_outputs(args)
    space = SearchSpace.load(args.space)
    proxy = make_proxy(args.proxy)
    loaded = _load(args)
    calib = calibration_data(loaded.tokenizer, args.calib_text, args.calib_windows, 0,
                             args.window_len)
    table = build_table(loaded, space, proxy, calib.calib, calib.digest,
                        log=_log)
    table.save(out)
    save_heatmap(table, png, title=f"{loaded.name}: {proxy.name} proxy, predicted Δloss (nats)")
    console.print(f"wrote {out} and {png}", highlight=False)
    _log(describe_peak({"peak_rss_bytes": peak_rss_bytes()}))
    return 0


def _sensitivity_outputs(args) -> tuple[Path, Path]:
    from .outputs import check_out_file, is_png, json_with_keys

    out = Path(args.out)
    png = out.with_suffix(".png")
    if png == out:
        raise AutocompressError(f"--out {args.out!r}: the table is JSON (its heat map goes "
                                "beside it as .png); give a name like table.json")
    inputs = [args.model, args.calib_text, args.space]
    check_out_file(out, force=args.force, inputs=inputs, what="sensitivity table",
                   is_ours=json_with_keys("proxy", "layers", "options", "cost"))
    check_out_file(png, force=args.force, inputs=inputs, is_ours=is_png, what="PNG")
    return out, png


def _print_device_estimate(estimate) -> None:
    from .report import decode_table, print_tables
    from .units import format_size

    verdict = "[green]fits[/green]" if estimate.fits else "[red]does not fit[/red]"
    console.print(f"memory on {estimate.device}: {format_size(estimate.footprint.total)} of "
                  f"{format_size(estimate.usable_bytes)} usable: {verdict}", highlight=False)
    print_tables(decode_table(estimate.decode, estimate.device), console=console)
    console.print(f"prefill of {estimate.prefill.tokens} tokens: "
                  f"{estimate.prefill.seconds * 1e3:.1f} ms "
                  f"({estimate.prefill.tokens_per_s:.0f} tokens/s)", highlight=False)


def cmd_devices(args) -> int:
    from .hardware.profile import ALIASES, available_profiles, read_profile
    from .report import devices_table, print_tables

    profiles, problems = {}, []
    for name, path in available_profiles().items():
        try:
            profiles[name] = read_profile(path)
        except AutocompressError as exc:
            problems.append(str(exc))
    print_tables(devices_table(profiles, ALIASES), console=Console())
    Console().print(f"--device jetson means {ALIASES['jetson']} (the Orin Nano developer kit "
                    "most edge deployments start from); any profile YAML path works too",
                    highlight=False)
    for problem in problems:
        console.print(f"[red]error:[/red] {problem}", highlight=False, soft_wrap=True)
    return 2 if problems else 0


def cmd_profile(args) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .hardware.architecture import read_config
    from .hardware.measure import RUNTIME_FORMATS, ProfileSettings, formats_from_names, \
        measure_profile
    from .hardware.profile import profile_to_yaml
    from .io_utils import atomic_write_text
    from .outputs import check_out_file, yaml_with_keys

    out = Path(args.out)
    if not out.parent.is_dir():
        raise AutocompressError(f"directory {out.parent} does not exist; create it first")
    if args.engine == "llamacpp":
        return _profile_llamacpp(args, out)
    check_out_file(out, force=args.force, inputs=[args.config, args.model], what="profile",
                   is_ours=yaml_with_keys("memory", "compute"))
    if args.config:
        arch = read_config(args.config)
    else:
        from .model import resolve_model_path

        _, hf_dir = resolve_model_path(args.model)
        arch = read_config(hf_dir / "config.json")
    formats = formats_from_names(args.formats) if args.formats else RUNTIME_FORMATS
    settings = ProfileSettings(name=args.name or out.stem.lower(), threads=args.threads,
                               formats=formats)
    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("profiling", total=1.0)
        profile = measure_profile(arch, settings, progress=lambda step, done: bar.update(
            task, completed=done, description=f"profiling: {step}"))
    atomic_write_text(out, profile_to_yaml(profile))
    console.print(f"wrote {out}: copy bandwidth {profile.memory.bandwidth_gbps:.1f} GB/s, "
                  f"f32 GEMM {profile.compute.peak_tflops['f32'] * 1e3:.0f} GFLOPS, "
                  f"{len(profile.lookup)} measured layer latencies; use it with --device {out}",
                  highlight=False)
    return 0


def _profile_llamacpp(args, out: Path) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .engines.llamacpp import library
    from .gguf_types import GGUF_TYPES
    from .hardware.llamacpp_speed import PROFILE_TYPES, REFERENCE, measure
    from .io_utils import atomic_write_text
    from .model import load_model
    from .outputs import check_out_file, yaml_with_keys

    check_out_file(out, force=args.force, inputs=[args.model], what="llama.cpp speed profile",
                   is_ours=yaml_with_keys("llamacpp_speed"))
    if args.config:
        raise AutocompressError("--engine llamacpp runs the model's GGUF files: give --model, "
                                "not --config")
    types = tuple(args.formats.split(",")) if args.formats else PROFILE_TYPES
    unknown = [t for t in types if t not in GGUF_TYPES]
    if unknown:
        raise AutocompressError(f"--formats {', '.join(unknown)}: not GGUF types (choose from "
                                f"{', '.join(GGUF_TYPES)})")
    if REFERENCE not in types:
        types = (REFERENCE,) + types
    library()
    loaded = load_model(args.model)
    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("profiling llama.cpp", total=1.0)
        speed = measure(loaded, types, threads=args.threads or 2,
                        progress=lambda step, done: bar.update(
                            task, completed=done, description=f"llama.cpp decode: {step}"))
    atomic_write_text(out, speed.to_yaml())
    fastest = max(speed.files, key=lambda f: f["tokens_per_s"])
    console.print(f"wrote {out}: {len(speed.files)} GGUF types of {loaded.name} decoded by "
                  f"llama.cpp, {fastest['type']} fastest at {fastest['tokens_per_s']:.1f} "
                  "tokens/s", highlight=False)
    return 0


def cmd_estimate(args) -> int:
    from .hardware.estimate import architecture_for, estimate_plan
    from .hardware.profile import load_device
    from .plan import Plan
    from .report import footprint_table, print_tables
    from .search.speed import predict_llamacpp_decode

    if not (args.device or args.speed_profile):
        raise AutocompressError("estimate needs --device (a device profile: `autocompress "
                                "devices` lists them) or --speed-profile (llama.cpp's, from "
                                "profile --engine llamacpp)")
    plan = Plan.load(args.plan)
    profile, note = load_device(args.device) if args.device else (None, None)
    speed = None
    if args.speed_profile:
        from .hardware.llamacpp_speed import LlamaCppSpeed

        speed = LlamaCppSpeed.load(args.speed_profile)
    if args.head_format:
        from .hardware.profile import check_format_name

        try:
            check_format_name(args.head_format)
        except ValueError as exc:
            raise AutocompressError(f"--head-format: {exc}") from None
    arch = architecture_for(plan, args.config, args.model)
    estimate = profile and estimate_plan(plan, arch, profile, args.context, args.batch,
                                         args.kv_bits, args.head_format, args.prompt_tokens)
    llamacpp = speed and predict_llamacpp_decode(plan, arch, speed, args.context)
    if args.json:
        print(json.dumps({"model": arch.name, **(estimate.as_dict() if estimate else {}),
                          **({"llamacpp_decode": {
                              "profile": str(args.speed_profile),
                              "seconds_per_token": llamacpp.seconds_per_token,
                              "tokens_per_s": llamacpp.tokens_per_s}}
                             if llamacpp else {})}))
    else:
        if estimate:
            print_tables(footprint_table(estimate.footprint, estimate.usable_bytes,
                                         title=f"Memory of {arch.name} on {profile.name}"),
                         console=console)
            _print_device_estimate(estimate)
        if llamacpp:
            console.print(f"llama.cpp decode on {speed.machine} ({speed.threads} threads), "
                          f"predicted from {args.speed_profile}: "
                          f"{llamacpp.tokens_per_s:.1f} tokens/s "
                          f"({llamacpp.seconds_per_token * 1e3:.1f} ms/token)", highlight=False)
    if note:
        _log(note)
    return 0


def cmd_study(args) -> int:
    from .outputs import check_search_dir, prepare_search_dir

    if args.name == "layers":
        return _study_layers(args)
    if args.name == "proxies":
        return _study_proxies(args)
    if args.name == "fronts":
        from .studies.fronts import ENTRIES, run_fronts

        settings, report = _fronts_settings(args), _report_fronts
        run, finished = run_fronts, "fronts.csv"
    else:
        from .studies.families import ENTRIES, run_families

        settings, report = _families_settings(args), _report_families
        run, finished = run_families, "families.csv"
    command = f"study {args.name}"
    state = check_search_dir(args.out, resume=args.resume, force=args.force,
                             inputs=[args.model, args.calib_text], command=command,
                             finished_file=finished)
    loaded = _load(args)
    prepare_search_dir(args.out, state, resume=args.resume, log=_log, command=command,
                       entries=ENTRIES)
    data = run(loaded, settings, Path(args.out), resume=args.resume, log=_log)
    report(args, loaded, data)
    return 0


def _study_dir(args, name: str, inputs: list, entries):
    """A multi-model study's --out checked and prepared (its NAME.csv marks it finished); the
    loader that puts each model on --compute-device in --dtype."""
    from .model import load_model
    from .outputs import check_search_dir, prepare_search_dir

    command = f"study {name}"
    state = check_search_dir(args.out, resume=args.resume, force=args.force, inputs=inputs,
                             command=command, finished_file=f"{name}.csv")
    prepare_search_dir(args.out, state, resume=args.resume, log=_log, command=command,
                       entries=entries)

    def load(spec: str):
        loaded = load_model(spec, dtype=args.dtype, device=args.compute_device)
        _say_placement(loaded)
        return loaded

    return load


def _study_layers(args) -> int:
    from .plan import LayerConfig
    from .studies.layers import ENTRIES, LayersSettings, ModelInput, run_layers

    specs = [m.strip() for m in (args.models or args.model).split(",") if m.strip()]
    # 'build' (or '-', which argparse only takes alone or as --tables=-,PATH): build one
    tables = [None if t.strip() in ("build", "-") else t.strip()
              for t in args.tables.split(",")] if args.tables else [None] * len(specs)
    if len(tables) != len(specs):
        raise AutocompressError(f"--tables: give one per model ({len(specs)}), 'build' to "
                                "build one")
    for table in tables:
        if table is not None and not Path(table).is_file():
            raise AutocompressError(f"--tables: {table!r} not found")
    if args.measure_windows < 0:
        raise AutocompressError("--measure-windows: 0 or more")
    settings = LayersSettings(option=LayerConfig(bits=args.layer_bits,
                                                 group_size=args.layer_group),
                              measure_windows=args.measure_windows,
                              measure_every=args.measure_every,
                              calib_windows=args.calib_windows, window_len=args.window_len,
                              calib_text=args.calib_text, proxy=args.proxy)
    models = [ModelInput(spec, table) for spec, table in zip(specs, tables)]
    load = _study_dir(args, "layers", [args.calib_text, *[t for t in tables if t is not None]],
                      ENTRIES)
    data = run_layers(models, settings, Path(args.out), resume=args.resume, log=_log, load=load)
    _report_layers(args, data)
    return 0


def _study_proxies(args) -> int:
    from rich.table import Table

    from .search.space import SearchSpace
    from .sensitivity.build import make_proxy
    from .studies.proxies import ENTRIES, ProxiesSettings, run_proxies

    specs = [m.strip() for m in (args.models or args.model).split(",") if m.strip()]
    settings = ProxiesSettings(proxies=tuple(p.strip() for p in args.proxies.split(",")
                                             if p.strip()),
                               space=args.space, plans_per_family=args.plans_per_family,
                               calib_windows=args.calib_windows,
                               holdout_windows=args.eval_windows, window_len=args.window_len,
                               calib_text=args.calib_text)
    for name in settings.proxies:
        make_proxy(name)  # a typo: said before any work
    SearchSpace.load(args.space)
    load = _study_dir(args, "proxies", [args.calib_text, args.space], ENTRIES)
    data = run_proxies(specs, settings, Path(args.out), resume=args.resume, log=_log, load=load)
    families = [*settings.families, "all"]
    table = Table(title="proxies: Spearman of the predicted cost against measured KL")
    for column in ("model", "proxy", "table s", *families):
        table.add_column(column, justify="left" if column in ("model", "proxy") else "right")
    for spec, entry in data["models"].items():
        for name, record in entry["proxies"].items():
            cells = [record["families"][f]["spearman"] for f in families]
            table.add_row(Path(spec).name, name, f"{record['table_s']:.0f}",
                          *["" if c is None else f"{c:.2f}" for c in cells])
    console.print(table)
    _log(f"wrote {args.out}/proxies.json, proxies.csv and figures/proxies.png")
    return 0


def _report_layers(args, data) -> None:
    from rich.table import Table

    from .studies.layers import KINDS

    table = Table(title="layers: share of the model's cost by kind (proxy / measured)")
    table.add_column("model")
    for kind in KINDS:
        table.add_column(kind, justify="right")
    table.add_column("proxy ~ measured", justify="right")
    for entry in data["models"].values():
        profiles = entry["profiles"]
        row = [entry["name"]]
        for kind in KINDS:
            parts = [f"{profiles[s]['kind'][kind]:.2f}" for s in ("proxy", "measured")
                     if s in profiles and kind in profiles[s]["kind"]]
            row.append(" / ".join(parts))
        rho = entry.get("proxy_vs_measured")
        row.append("" if rho is None else f"ρ {rho:.2f}")
        table.add_row(*row)
    console.print(table)
    for pair, row in data.get("correlations", {}).items():
        parts = [f"{source} by kind ρ {v['kind']:.2f}, by depth ρ {v['depth']:.2f}"
                 for source, v in row.items() if v["kind"] is not None and v["depth"] is not None]
        if parts:
            console.print(f"{pair}: " + "; ".join(parts), highlight=False)
    _log(f"wrote {args.out}/layers.json, layers.csv and figures/layers.png, profiles.png")


def _fronts_settings(args):
    from .hardware.profile import load_profile
    from .studies.fronts import FrontsSettings

    devices = tuple(d.strip() for d in (args.devices or "").split(",") if d.strip())
    if len(set(devices)) < 2:
        raise AutocompressError("--devices: a fronts study compares devices: give at least two")
    for device in devices:
        load_profile(device)  # an unknown device: said before any work
    return FrontsSettings(devices=devices, space=args.space, points=args.points,
                          eval_windows=args.eval_windows, calib_windows=args.calib_windows,
                          window_len=args.window_len, context=args.context,
                          calib_text=args.calib_text, proxy=args.proxy,
                          min_tps=_min_tps(args.min_tps))


def _min_tps(text: str | None) -> tuple[tuple[str, float], ...]:
    """--min-tps DEVICE=TPS,...: pairs in the order given."""
    pairs = []
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        device, _, tps = part.rpartition("=")
        try:
            value = float(tps)
        except ValueError:
            value = None
        if not device or value is None:
            raise AutocompressError(f"--min-tps: {part!r} is not DEVICE=TOKENS_PER_S (e.g. "
                                    "raspberry-pi-5-8gb=50)")
        pairs.append((device.strip(), value))
    return tuple(pairs)


def _families_settings(args):
    from .studies.families import FamiliesSettings, family_spaces

    try:
        bits = tuple(float(b) for b in args.bits.split(","))
    except ValueError:
        raise AutocompressError(f"--bits {args.bits!r}: give bits per weight, e.g. "
                                "2.5,3,3.5,4") from None
    if not all(2 <= b <= 8 for b in bits):
        raise AutocompressError(f"--bits {args.bits!r}: budgets between 2 and 8 bits")
    families = FamiliesSettings.families
    if args.families:
        families = tuple(f.strip() for f in args.families.split(",") if f.strip())
        # "pruning, 16-bit" holds a comma: rejoin what splitting cut
        known, joined, pending = set(family_spaces()), [], ""
        for part in families:
            pending = f"{pending}, {part}" if pending else part
            if pending in known:
                joined.append(pending)
                pending = ""
        if pending or not joined:
            raise AutocompressError(f"--families {args.families!r}: choose from "
                                    f"{'; '.join(family_spaces())}")
        families = tuple(joined)
    return FamiliesSettings(bits=bits, families=families, holdout_windows=args.eval_windows,
                            calib_windows=args.calib_windows, window_len=args.window_len,
                            context=args.context, calib_text=args.calib_text, proxy=args.proxy)


def _report_fronts(args, loaded, data) -> None:
    from rich.table import Table

    from .units import format_size

    table = Table(title=f"fronts: {data['protocol']['model']}")
    for column in ("device", "memory", "predicted tok/s", "KL", "ppl"):
        table.add_column(column, justify="left" if column == "device" else "right")
    for device, front in data["devices"].items():
        for p in front:
            table.add_row(device, format_size(p["total_bytes"]), f"{p['tokens_per_s']:.1f}",
                          f"{p['kl']:.4f}", f"{p['ppl']:.2f}")
    console.print(table)
    equal = data["equal_memory"]
    if equal.get("capacity_bytes"):
        _log(f"at {format_size(equal['capacity_bytes'])} of layers the devices' plans differ in "
             f"{len(equal['layers_that_differ'])} of {len(loaded.layers)} layers "
             f"(figures/formats.png)")
    _log(f"wrote {args.out}/fronts.json, fronts.csv and figures/")


def _report_families(args, loaded, data) -> None:
    from rich.table import Table

    from .units import format_size

    table = Table(title=f"families: {data['protocol']['model']} (KL on held-out windows)")
    table.add_column("family")
    bits = list(dict.fromkeys(c["bits"] for c in data["cells"].values()))
    for b in bits:
        table.add_column(f"{b:g}-bit bytes", justify="right")
    for family in dict.fromkeys(c["family"] for c in data["cells"].values()):
        row = [family]
        for b in bits:
            cell = data["cells"].get(f"{family}@{b:g}")
            row.append("" if cell is None else "does not fit" if not cell["feasible"]
                       else f"{cell['kl']:.4f} ({format_size(cell['total_bytes'])})")
        table.add_row(*row)
    console.print(table)
    _log(f"wrote {args.out}/families.json, families.csv and figures/families.png")


COMMANDS = {"study": cmd_study, "layers": cmd_layers, "sensitivity": cmd_sensitivity, "plan": cmd_plan, "apply": cmd_apply, "export": cmd_export, "eval": cmd_eval,
            "search": cmd_search, "devices": cmd_devices, "profile": cmd_profile,
            "estimate": cmd_estimate}

if __name__ == "__main__":
    sys.exit(main())
