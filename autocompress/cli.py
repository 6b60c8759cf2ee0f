"""Command line: one sub-command per verb. Parses, calls the library, prints. No logic here."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from .errors import AutocompressError

console = Console(stderr=True)  # tables and logs on stderr; stdout carries --json output


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
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


def _add_calib(p: argparse.ArgumentParser, windows: int) -> None:
    p.add_argument("--calib-text", default=None,
                   help="calibration text file (default: the embedded pydoc corpus)")
    p.add_argument("--calib-windows", type=_positive_int, default=windows,
                   help="calibration windows (default: %(default)s)")
    p.add_argument("--window-len", type=_positive_int, default=512, help="tokens per window")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autocompress",
        description="Find per-layer compression plans for LLMs under a memory budget.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("layers", help="list the compressible linear layers of a model")
    _add_model(p)

    p = sub.add_parser("plan", help="write a uniform plan (a baseline)")
    _add_model(p)
    p.add_argument("--bits", type=int, required=True)
    p.add_argument("--group-size", type=_group_size, default=64)
    p.add_argument("--sym", action="store_true", help="symmetric grid (default asymmetric)")
    p.add_argument("--method", choices=["rtn", "gptq"], default="rtn")
    p.add_argument("--sparsity", type=float, default=0.0)
    p.add_argument("--pattern", choices=["unstructured", "2:4"], default="unstructured")
    p.add_argument("--prune-method", choices=["magnitude", "wanda"], default="wanda")
    p.add_argument("--rank-ratio", type=float, default=1.0)
    p.add_argument("--out", required=True, help="plan JSON to write")
    _add_memory(p)

    p = sub.add_parser("apply", help="write the compressed model (safetensors + plan)")
    p.add_argument("plan")
    _add_model(p, None)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--packed", action="store_true",
                   help="write bit-packed low-bit storage (runtime format) instead of float16")
    p.add_argument("--mode", choices=["sequential", "parallel"], default="sequential",
                   help="GPTQ/Wanda calibration through the compressed prefix, or not")
    _add_calib(p, 16)

    p = sub.add_parser("eval", help="perplexity and KL of a plan on evaluation text")
    p.add_argument("plan")
    _add_model(p, None)
    p.add_argument("--eval-text", default=None,
                   help="evaluation text file (default: the embedded pydoc corpus, eval part)")
    p.add_argument("--windows", type=_positive_int, default=None,
                   help="evaluation windows (default: 40, or as many as the text holds)")
    p.add_argument("--no-kl", action="store_true", help="skip KL (halves the time)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--mode", choices=["sequential", "parallel"], default="sequential")
    _add_calib(p, 16)
    _add_memory(p)

    p = sub.add_parser("sensitivity", help="build a sensitivity table (layers x options) and a heat map")
    _add_model(p)
    p.add_argument("--proxy", default="fisher", help="fisher | hessian | hutchinson | measured")
    p.add_argument("--space", default="search_spaces/default.yaml", help="search space YAML")
    p.add_argument("--out", required=True, help="table JSON to write (the PNG goes beside it)")
    _add_calib(p, 8)

    p = sub.add_parser("search", help="search a per-layer plan under a memory budget")
    _add_model(p)
    p.add_argument("--budget", required=True, help="whole footprint: 4GB, 3.5GiB, 80MB, 62000000")
    p.add_argument("--bits", type=_bits_list, default=[2, 3, 4, 8], help="bit widths to choose from")
    p.add_argument("--group-size", type=_group_size, default=64)
    p.add_argument("--space", default=None,
                   help="search space YAML (search_spaces/*.yaml); replaces --bits/--group-size")
    p.add_argument("--out", required=True, help="output directory (plan.json, tables)")
    p.add_argument("--proxy", default="fisher", help="fisher | hessian | hutchinson | measured")
    p.add_argument("--holdout-windows", type=_positive_int, default=4,
                   help="held-out calibration windows to measure candidates on")
    _add_calib(p, 8)
    _add_memory(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except AutocompressError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        console.print("interrupted; files already written are kept", highlight=False)
        return 130


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
    from .model import load_model
    from .plan import LayerConfig, uniform_plan
    from .report import footprint_table, print_tables

    config = LayerConfig(bits=args.bits, group_size=args.group_size, sym=args.sym,
                         method=args.method, sparsity=args.sparsity, pattern=args.pattern,
                         prune_method=args.prune_method, rank_ratio=args.rank_ratio)
    loaded = load_model(args.model)
    plan = uniform_plan(loaded.identity, config)
    fp = model_footprint(loaded, plan.resolve(l.name for l in loaded.layers), args.context, args.batch)
    plan.figures.update({"footprint": fp.as_dict(), "context": args.context, "batch": args.batch})
    plan.save(args.out)
    print_tables(footprint_table(fp, title=f"{config.short()} on {loaded.name}"), console=console)
    console.print(f"wrote {args.out}")
    return 0


def _load_for_plan(args):
    from .model import load_model
    from .plan import Plan

    plan = Plan.load(args.plan)
    loaded = load_model(args.model or plan.model.source or plan.model.name)
    plan.check_model(loaded.identity)
    plan.check_override_names(layer.name for layer in loaded.layers)
    return plan, loaded


def _calib_windows(args, loaded, plan):
    from .compress.apply import uses_calibration
    from .data import load_stream

    if not uses_calibration(plan.resolve(l.name for l in loaded.layers).values()):
        return None
    stream = load_stream(loaded.tokenizer, args.calib_text, "calib")
    return stream.windows(args.calib_windows, args.window_len)


def cmd_apply(args) -> int:
    from .compress.apply import compress_model
    from .export.safetensors import save_compressed

    plan, loaded = _load_for_plan(args)
    calib = _calib_windows(args, loaded, plan)
    if args.packed:
        from .runtime.convert import apply_packed
        from .units import format_size

        sizes = apply_packed(loaded, plan, args.out, calib, mode=args.mode)
        console.print(f"wrote packed model to {args.out}: block linears "
                      f"{format_size(sizes['packed_layer_bytes'])} "
                      f"(plan accounting {format_size(sizes['accounted_layer_bytes'])})",
                      highlight=False)
        return 0
    model = compress_model(loaded, plan, calib, mode=args.mode)
    save_compressed(model, loaded, plan, args.out)
    console.print(f"wrote compressed model to {args.out}")
    return 0


def cmd_eval(args) -> int:
    from .accounting import model_footprint
    from .compress.apply import compress_model
    from .data import load_stream
    from .evaluate import evaluate
    from .report import footprint_table, print_tables

    plan, loaded = _load_for_plan(args)
    stream = load_stream(loaded.tokenizer, args.eval_text, "eval")
    n_windows = args.windows or min(40, stream.max_windows(args.window_len))
    windows = stream.windows(n_windows, args.window_len)
    model = compress_model(loaded, plan, _calib_windows(args, loaded, plan), mode=args.mode)
    result = evaluate(model, windows, None if args.no_kl else loaded.model)
    configs = plan.resolve(l.name for l in loaded.layers)
    fp = model_footprint(loaded, configs, args.context, args.batch)
    record = {**result.as_dict(), "weight_bytes": fp.weights, "total_bytes": fp.total,
              "layer_weight_bytes": fp.layer_weights, "eval_text": stream.source,
              "window_len": args.window_len}
    if args.json:
        print(json.dumps(record))
    else:
        print_tables(footprint_table(fp), console=console)
        kl = "" if result.kl is None else f", KL {result.kl:.4f} nats/token"
        Console().print(f"perplexity {result.ppl:.3f}{kl} on {result.windows} windows of "
                        f"{args.window_len} tokens of {stream.source}", highlight=False)
    return 0


def cmd_search(args) -> int:
    from .model import load_model
    from .report import candidates_table, footprint_table, kinds_table, print_tables
    from .search.engine import SearchSettings, run_search
    from .search.space import SearchSpace
    from .units import parse_size

    budget = parse_size(args.budget)
    space = SearchSpace.from_yaml(args.space) if args.space else \
        SearchSpace.bits_only(args.bits, group_size=args.group_size)
    loaded = load_model(args.model)
    settings = SearchSettings(budget=budget, context=args.context, batch=args.batch,
                              n_calib=args.calib_windows, n_holdout=args.holdout_windows,
                              window_len=args.window_len, calib_text=args.calib_text,
                              proxy=args.proxy)
    result = run_search(loaded, space, settings, out_dir=args.out,
                        log=lambda m: console.print(m, highlight=False))
    chosen = result.chosen
    print_tables(kinds_table(loaded.layers, chosen.configs),
                 footprint_table(chosen.footprint, budget),
                 candidates_table(result.candidates, chosen.label), console=console)
    console.print(f"chosen: {chosen.label}; wrote {Path(args.out) / 'plan.json'}", highlight=False)
    return 0


def cmd_sensitivity(args) -> int:
    from .data import calibration_data
    from .model import load_model
    from .search.space import SearchSpace
    from .sensitivity.build import build_table, make_proxy
    from .sensitivity.heatmap import save_heatmap

    space = SearchSpace.from_yaml(args.space)
    proxy = make_proxy(args.proxy)
    loaded = load_model(args.model)
    calib = calibration_data(loaded.tokenizer, args.calib_text, args.calib_windows, 0,
                             args.window_len)
    table = build_table(loaded, space, proxy, calib.calib, calib.digest,
                        log=lambda m: console.print(m, highlight=False))
    out = Path(args.out)
    table.save(out)
    png = out.with_suffix(".png")
    save_heatmap(table, png, title=f"{loaded.name}: {proxy.name} proxy, predicted Δloss (nats)")
    console.print(f"wrote {out} and {png}", highlight=False)
    return 0


COMMANDS = {"layers": cmd_layers, "sensitivity": cmd_sensitivity, "plan": cmd_plan, "apply": cmd_apply, "eval": cmd_eval,
            "search": cmd_search}

if __name__ == "__main__":
    sys.exit(main())
