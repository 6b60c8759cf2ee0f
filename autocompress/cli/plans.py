"""`layers`, `plan`, `apply` and `export`: a plan made, built and written out."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from rich.console import Console

from ..errors import AutocompressError
from ..peak_memory import describe as describe_peak, peak_rss_bytes
from .common import _build_recipe, _kd_settings, _load_for_plan, _warn_embedded_corpus
from .output import _log, console


def cmd_layers(args) -> int:
    from rich.table import Table

    from ..model import load_model

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
    from ..accounting import model_footprint
    from ..plan import LayerConfig, uniform_plan
    from ..outputs import check_out_file, json_with_keys
    from ..report import footprint_table, print_tables

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
        from ..hardware.architecture import read_config
        from ..hardware.memory import memory_breakdown
        from ..model import model_identity

        arch = read_config(args.config)
        name, identity = arch.name, model_identity(arch.name, arch.layers)
        identity.source = str(args.config)
        fp = memory_breakdown(arch, [config] * len(arch.layers), args.context, args.batch)
    else:
        from ..model import load_model

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
    from ..accounting import model_footprint
    from ..gguf_recipes import RECIPES, recipe_plan
    from ..model import load_model
    from ..plan import LayerConfig
    from ..report import footprint_table, print_tables

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
    from ..gguf_types import fallback_notes

    entries = [(info.name, cfg.gguf, *info.shape) for info in loaded.layers + loaded.tables
               for cfg in [plan.config_for(info.name)] if cfg.is_gguf]
    for line in fallback_notes(entries):
        console.print(f"note: {line}", highlight=False)


def _plan_config(args):
    from ..plan import LayerConfig

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
    from ..compress.apply import uses_calibration
    from ..data import calibration_data
    from ..provenance import Provenance

    calib_text = str(Path(args.calib_text).resolve()) if args.calib_text else None
    digest = None
    if tokenizer is not None and uses_calibration([config]):
        digest = calibration_data(tokenizer, calib_text, args.calib_windows, 0,
                                  args.window_len).digest
        _warn_embedded_corpus(calib_text)
    return Provenance(calib_text=calib_text, calib_windows=args.calib_windows,
                      window_len=args.window_len, calib_digest=digest, mode=args.mode)


def cmd_apply(args) -> int:
    from ..compress.reproduce import built_in_place
    from ..export.safetensors import save_compressed
    from ..outputs import check_out_dir

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
        from ..runtime.convert import apply_packed
        from ..units import format_size

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

    from ..compress.recover import recovered_in_place
    from ..export.safetensors import save_compressed

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
        from ..runtime.convert import apply_packed

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
    from ..export.gguf import check_exportable, export_gguf, is_our_gguf, source_gguf
    from ..outputs import check_out_file
    from ..units import format_size

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
