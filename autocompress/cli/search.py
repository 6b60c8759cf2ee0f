"""`search` and `sensitivity`."""

from __future__ import annotations

from pathlib import Path

from ..errors import AutocompressError
from ..peak_memory import describe as describe_peak, peak_rss_bytes
from .common import _kd_settings, _load
from .output import _log, console


def _device_and_latency(args):
    """(profile or None, what an alias chose or None, most seconds per token or None) from
    --device/--latency/--min-tps."""
    from ..units import parse_duration

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
        from ..hardware.profile import load_device

        device, note = load_device(args.device)
    return device, note, (min(limits) if limits else None)


def cmd_search(args) -> int:
    from ..report import (
        candidates_table,
        decode_table,
        footprint_table,
        kinds_table,
        print_tables,
    )
    from ..outputs import check_search_dir, prepare_search_dir
    from ..search.engine import SearchSettings, run_search
    from ..search.optuna_level import check_storage
    from ..sensitivity.build import make_proxy
    from ..search.space import SearchSpace
    from ..units import parse_size

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
        from ..hardware.llamacpp_speed import LlamaCppSpeed

        speed = LlamaCppSpeed.load(args.speed_profile)
    inputs = [args.model, args.calib_text, args.space, args.device, args.speed_profile]
    state = check_search_dir(args.out, resume=args.resume, force=args.force, inputs=inputs)
    check_storage(args.storage, args.out)
    if args.address:
        from ..search.ray_cluster import check_cluster_address

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
        from ..engines.llamacpp import library

        library()  # llama.cpp missing or mismatched: said before any work
    loaded = _load(args)
    if export == "gguf":
        from ..export.gguf import source_gguf

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
        from ..search.deploy import GGUF_FILE, export_and_confirm, exports_gguf
        from ..units import format_size

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
    from ..data import calibration_data
    from ..search.space import SearchSpace
    from ..sensitivity.build import build_table, make_proxy
    from ..sensitivity.heatmap import save_heatmap

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
    from ..outputs import check_out_file, is_png, json_with_keys

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
