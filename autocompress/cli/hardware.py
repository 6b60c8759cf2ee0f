"""`devices`, `profile` and `estimate`: the device profiles."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from ..errors import AutocompressError
from .common import _print_device_estimate
from .output import _log, console


def cmd_devices(args) -> int:
    from ..hardware.profile import ALIASES, available_profiles, read_profile
    from ..report import devices_table, print_tables

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

    from ..hardware.architecture import read_config
    from ..hardware.measure import RUNTIME_FORMATS, ProfileSettings, formats_from_names, \
        measure_profile
    from ..hardware.profile import profile_to_yaml
    from ..io_utils import atomic_write_text
    from ..outputs import check_out_file, yaml_with_keys

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
        from ..model import resolve_model_path

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

    from ..engines.llamacpp import library
    from ..gguf_types import GGUF_TYPES
    from ..hardware.llamacpp_speed import PROFILE_TYPES, REFERENCE, measure
    from ..io_utils import atomic_write_text
    from ..model import load_model
    from ..outputs import check_out_file, yaml_with_keys

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
    from ..hardware.estimate import architecture_for, estimate_plan
    from ..hardware.profile import load_device
    from ..plan import Plan
    from ..report import footprint_table, print_tables
    from ..search.speed import predict_llamacpp_decode

    if not (args.device or args.speed_profile):
        raise AutocompressError("estimate needs --device (a device profile: `autocompress "
                                "devices` lists them) or --speed-profile (llama.cpp's, from "
                                "profile --engine llamacpp)")
    plan = Plan.load(args.plan)
    profile, note = load_device(args.device) if args.device else (None, None)
    speed = None
    if args.speed_profile:
        from ..hardware.llamacpp_speed import LlamaCppSpeed

        speed = LlamaCppSpeed.load(args.speed_profile)
    if args.head_format:
        from ..hardware.profile import check_format_name

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
