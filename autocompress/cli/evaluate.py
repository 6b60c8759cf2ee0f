"""`eval`: a plan's quality (torch or llama.cpp), bytes and device estimate."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from ..errors import AutocompressError
from ..peak_memory import describe as describe_peak, peak_rss_bytes
from .common import _build_recipe, _load_for_plan, _print_device_estimate
from .output import _log, console


def cmd_eval(args) -> int:
    from ..accounting import model_footprint
    from ..compress.reproduce import built_in_place
    from ..data import load_stream
    from ..evaluate import ReferenceCache, evaluate
    from ..report import footprint_table, print_tables

    if args.engine == "llamacpp":  # checked before the model loads
        from ..engines.llamacpp import library

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
        from ..hardware.profile import load_profile

        profile = load_profile(args.device)
    plan, loaded = _load_for_plan(args)
    if args.holdout:
        from ..search.holdout import holdout_windows

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
        from ..engines.llamacpp import LlamaCppEngine

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
        from ..hardware.architecture import Architecture
        from ..hardware.estimate import estimate_plan

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


def _search_gguf(plan_path: str) -> str | None:
    """The model.gguf a GGUF search wrote beside its plan.json, if it is there."""
    from ..plan import Plan
    from ..search.deploy import GGUF_FILE

    try:
        figures = Plan.load(plan_path).figures
    except AutocompressError:
        return None  # the plan's own error is said where it is loaded
    path = Path(plan_path).parent / GGUF_FILE
    if isinstance(figures.get("llamacpp"), dict) and path.is_file():
        _log(f"running {path} (the GGUF this search wrote beside its plan)")
        return str(path)
    return None
