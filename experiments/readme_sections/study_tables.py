"""The studies' tables (autocompress study layers / fronts / proxies / families)."""

from __future__ import annotations

from pathlib import Path

from results_schema import STUDY_RUNS, Rhos, validate_study

from .format import Store, _secs


def _study(store: Store, directory: str):
    """A study's results as `experiments/studies.py DIRECTORY` copied them, validated
    (results_schema.validate_study; FileNotFoundError: not run yet)."""
    name = STUDY_RUNS.get(directory, directory)
    return validate_study(store.root / "studies" / directory / f"{name}.json", name)


def _rho(value) -> str:
    return "–" if value is None else f"{value:+.2f}"


def _option(o) -> str:
    """A study protocol's LayerConfig, in words."""
    group = "per channel" if o.group_size == -1 else f"groups of {o.group_size}"
    return f"{o.bits}-bit {o.method.upper()}, {group}, {'sym' if o.sym else 'asym'}metric"


def studies_layers(store: Store) -> str:
    data = _study(store, "layers")
    p = data.protocol
    rows = ["| model | layers (measured) | proxy vs measured, Spearman ρ | share of cost by kind, "
            "proxy | by kind, measured |", "| --- | ---: | ---: | --- | --- |"]
    for entry in data.models.values():
        def shares(source):
            profile = entry.profiles.get(source)
            return "–" if profile is None or not profile.kind else \
                ", ".join(f"{k} {v:.0%}" for k, v in profile.kind.items())
        rows.append(f"| {entry.name} | {len(entry.layers)} ({len(entry.measured)}) | "
                    f"{_rho(entry.proxy_vs_measured)} | {shares('proxy')} | "
                    f"{shares('measured')} |")
    names = {spec: e.name for spec, e in data.models.items()}
    none = Rhos()

    def rhos(row, source):
        return row.get(source, none)
    pairs = [f"{' vs '.join(names.get(s, s) for s in pair.split(' vs '))}: by kind ρ "
             f"{_rho(rhos(row, 'proxy').kind)} (proxy), {_rho(rhos(row, 'measured').kind)} "
             f"(measured); by depth ρ {_rho(rhos(row, 'proxy').depth)} (proxy), "
             f"{_rho(rhos(row, 'measured').depth)} (measured)"
             for pair, row in data.correlations.items()]
    sources = "; ".join(
        f"{e.name}: "
        f"{'table ' + Path(e.source.table).name if e.source.table else 'table built here'}"
        f" ({e.source.proxy})" for e in data.models.values())
    every = (f"blocks 0, {p.measure_every}, {2 * p.measure_every}, …" if p.measure_every > 1
             else "every block")
    text = Path(p.calib_text).name if p.calib_text else "the default corpus"
    return "\n".join(rows) + (
        f"\n\nBetween the models: {'; '.join(pairs)}. Protocol: the option profiled "
        f"{_option(p.option)}; proxy: each layer's predicted Δ loss alone at that option "
        f"({sources}); measured: KL to the uncompressed model on {p.measure_windows} held-out "
        f"window(s) of {p.window_len} tokens of {text}, that layer alone compressed, in {every}; "
        f"depth in {p.depth_bins} equal slices. Reproduce: `.venv/bin/python "
        "experiments/studies.py layers`.")


def studies_fronts(store: Store, directory: str = "fronts") -> str:
    data = _study(store, directory)
    p = data.protocol
    limits = p.min_tps
    rows = ["| device | plans | memory on the device | KL to uncompressed | predicted decode |"
            + (" decode at least |" if limits else ""),
            "| --- | ---: | --- | --- | --- |" + (" ---: |" if limits else "")]
    for device, front in data.devices.items():
        mb = [pt.total_bytes / 1e6 for pt in front]
        kl = [pt.kl for pt in front]
        tps = [pt.tokens_per_s for pt in front]
        limit = (f" {limits[device]:g} |" if device in limits else " – |") if limits else ""
        rows.append(f"| {device} | {len(front)} | {min(mb):.0f}–{max(mb):.0f} MB | "
                    f"{min(kl):.4f}–{max(kl):.4f} | {min(tps):.1f}–{max(tps):.1f} tokens/s |"
                    + limit)
    equal = data.equal_memory
    if equal.capacity_bytes and equal.devices:
        n_layers = len(next(iter(equal.devices.values())).formats)
        same = (f"At {equal.capacity_bytes / 1e6:.0f} MB of layer bytes the devices' optima "
                f"differ in {len(equal.layers_that_differ)} of {n_layers} layers")
        speeds = [f"{d} {e.tokens_per_s:.1f}" for d, e in equal.devices.items()
                  if e.tokens_per_s is not None]
        if speeds:
            same += f" (their predicted decode, tokens/s: {', '.join(speeds)})"
    else:
        same = "The devices' plan sizes do not overlap"
    limited = ("; each device's plans held to the decode speed in the last column "
               "(--min-tps)" if limits else "")
    return "\n".join(rows) + (
        f"\n\n{same} (figures/formats.png). Protocol: {p.model}; the exact proxy front "
        f"({p.proxy}, {p.calib_windows} calibration windows of {p.window_len}) at "
        f"{p.points} memory levels per device, with the bytes each device's engine holds each "
        f"format in{limited}; {p.measure}; speed: {p.speed} of {p.context}. Reproduce: "
        f"`.venv/bin/python experiments/studies.py {directory}`.")


def studies_proxies(store: Store) -> str:
    data = _study(store, "proxies")
    p = data.protocol
    families = [*p.families, "all"]
    rows = ["| model | proxy | table | " + " | ".join(f"{f}" for f in families) + " |",
            "| --- | --- | ---: |" + " ---: |" * len(families)]
    for spec, entry in data.models.items():
        for name, record in entry.proxies.items():
            cells = [_rho(record.families[f].spearman) if f in record.families else "–"
                     for f in families]
            attempts = len(record.attempts_s or [])
            # a resumed table's time holds each attempt's own start-up (its forward redone)
            cost = f"{_secs(record.table_s)} s" + (f" ({attempts} attempts)"
                                                   if attempts > 1 else "")
            rows.append(f"| {Path(spec).name} | {name} | {cost} | " + " | ".join(cells) + " |")
    plans = {Path(spec).name: len(e.plans) for spec, e in data.models.items()}
    text = Path(p.calib_text).name if p.calib_text else "the default corpus"
    return "\n".join(rows) + (
        f"\n\nSpearman ρ between each proxy's additive prediction and the measured KL of random "
        f"plans per option family ({p.plans_per_family} per family; plans measured: "
        f"{', '.join(f'{m} {n}' for m, n in plans.items())}); table: the wall time of the "
        f"proxy's table on {p.calib_windows} calibration windows of {p.window_len} tokens of "
        f"{text}, summed over the attempts of a table that was stopped and resumed (each "
        f"attempt redoes its forward pass). Protocol: {p.measured}; cost: {p.cost}. "
        "Reproduce: `.venv/bin/python experiments/studies.py proxies`.")


def studies_families(store: Store) -> str:
    data = _study(store, "families")
    p = data.protocol
    cells = data.cells
    bits = sorted({c.bits for c in cells.values()})
    families = list(dict.fromkeys(c.family for c in cells.values()))
    rows = ["| family | " + " | ".join(f"{b:g}-bit bytes: KL (ppl)" for b in bits) + " |",
            "| --- |" + " ---: |" * len(bits)]
    for family in families:
        row = []
        for b in bits:
            cell = cells.get(f"{family}@{b:g}")
            row.append("not run" if cell is None else
                       "does not fit" if not cell.feasible else
                       f"{cell.kl:.4f} ({cell.ppl:.1f})")
        rows.append(f"| {family} | " + " | ".join(row) + " |")
    budgets = ", ".join(
        f"{b:g}: {next(c.budget_bytes for c in cells.values() if c.bits == b) / 1e6:.1f} MB"
        for b in bits)
    return "\n".join(rows) + (
        f"\n\nProtocol: {p.model}; budget: {p.budget} {p.context} ({budgets}); "
        f"search: {p.search} ({p.proxy} table on {p.calib_windows} calibration "
        f"windows); {p.measure}. Reproduce: `.venv/bin/python experiments/studies.py "
        "families`.")
