"""`study NAME`: the research studies (autocompress/studies/)."""

from __future__ import annotations

from pathlib import Path

from ..errors import AutocompressError
from .common import _load, _say_placement
from .output import _log, console


def cmd_study(args) -> int:
    from ..outputs import check_search_dir, prepare_search_dir

    if args.name == "layers":
        return _study_layers(args)
    if args.name == "proxies":
        return _study_proxies(args)
    if args.name == "fronts":
        from ..studies.fronts import ENTRIES, run_fronts

        settings, report = _fronts_settings(args), _report_fronts
        run, finished = run_fronts, "fronts.csv"
    else:
        from ..studies.families import ENTRIES, run_families

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
    from ..model import load_model
    from ..outputs import check_search_dir, prepare_search_dir

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
    from ..plan import LayerConfig
    from ..studies.layers import ENTRIES, LayersSettings, ModelInput, run_layers

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

    from ..search.space import SearchSpace
    from ..sensitivity.build import make_proxy
    from ..studies.proxies import ENTRIES, ProxiesSettings, run_proxies

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

    from ..studies.layers import KINDS

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
    from ..hardware.profile import load_profile
    from ..studies.fronts import FrontsSettings

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
    from ..studies.families import FamiliesSettings, family_spaces

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

    from ..units import format_size

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

    from ..units import format_size

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
