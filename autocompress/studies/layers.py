"""`study layers`: which layers tolerate a format, by proxy and by measurement, across models.

For each model, every block linear's cost at one format (``option``, default 3-bit RTN in
groups of 64, asymmetric) is taken two ways:

- by proxy: the sensitivity table's predicted increase of the LM loss for that layer alone at
  that option (a table given with ``tables``, e.g. a search's sensitivity.json, or one built
  here with the proxy on the calibration windows);
- by measurement: the KL to the uncompressed model on ``measure_windows`` held-out windows with
  that layer alone compressed, the others in float16 as every plan stores them
  (``measure_every``: every k-th block only, for large models).

Per model, the costs are summed by kind (q, k, v, o, gate, up, down) and by depth (the blocks
in ``depth_bins`` equal slices), each as a share of the model's total, so that models of
different sizes compare; Spearman's rank correlation then says how alike two models' profiles
are (by kind and by depth), and, per model, how well the proxy ranks the measured layers.

Outputs in ``out``: layers.json (protocol; per model the per-layer costs, the profiles; the
correlations), layers.csv (one row per layer and model), figures/layers.png (per model: a
blocks × kinds heat map of the proxy's share) and figures/profiles.png (the kind and depth
profiles of all models side by side). A model's measurements are saved as they are made: a
rerun with ``resume`` goes on from the last one.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import AutocompressError
from ..io_utils import atomic_save_figure, atomic_write_text
from ..model import LoadedModel
from ..plan import LayerConfig
from .store import StudyFile

ENTRIES = ("layers.json", "layers.csv", "figures")
KINDS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class LayersSettings:
    option: LayerConfig = field(default_factory=lambda: LayerConfig(bits=3, group_size=64))
    measure_windows: int = 2  # 0: by proxy only
    measure_every: int = 1  # measure the layers of every k-th block
    calib_windows: int = 8
    window_len: int = 512
    calib_text: str | None = None
    proxy: str = "fisher"
    depth_bins: int = 10


@dataclass
class ModelInput:
    """One model of the study: how to load it, and the sensitivity table to read (or None:
    build one)."""

    spec: str
    table: str | None = None


def option_costs(table, option: LayerConfig) -> dict[str, float]:
    """Each layer's proxy cost at ``option`` in a sensitivity table."""
    costs = {}
    for name, options, cost in zip(table.layers, table.options, table.cost):
        if option not in options:
            shown = ", ".join(sorted({o.short() for o in options})[:8])
            raise AutocompressError(f"the sensitivity table has no option {option.short()} for "
                                    f"{name} (it has {shown}); give a table with it, or "
                                    "--bits/--group-size of one it has")
        costs[name] = float(cost[options.index(option)])
    return costs


def kind_profile(costs: dict[str, float], kinds: dict[str, str]) -> dict[str, float]:
    """Share of the total cost per kind (kinds a model lacks are left out)."""
    total = sum(costs.values()) or 1.0
    out: dict[str, float] = {}
    for name, cost in costs.items():
        out[kinds[name]] = out.get(kinds[name], 0.0) + cost / total
    return {k: out[k] for k in KINDS if k in out}


def depth_profile(costs: dict[str, float], blocks: dict[str, int], n_blocks: int,
                  bins: int) -> list[float]:
    """Share of the total cost in each of ``bins`` equal slices of the model's depth."""
    total = sum(costs.values()) or 1.0
    out = [0.0] * bins
    for name, cost in costs.items():
        out[min(bins - 1, blocks[name] * bins // n_blocks)] += cost / total
    return out


def spearman(a: list[float], b: list[float]) -> float | None:
    """Rank correlation; None when either side is constant or too short."""
    from scipy.stats import spearmanr

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return float(spearmanr(a, b).statistic)


def _table(loaded: LoadedModel, model: ModelInput, settings: LayersSettings, log):
    from ..data import calibration_data
    from ..search.space import SearchSpace
    from ..sensitivity.build import build_table, make_proxy
    from ..sensitivity.table import SensitivityTable

    if model.table is not None:
        table = SensitivityTable.load(model.table)
        if set(table.layers) != {layer.name for layer in loaded.layers}:
            raise AutocompressError(f"the sensitivity table {model.table} is not {model.spec}'s "
                                    "(its layers differ)")
        return table, {"table": str(Path(model.table).resolve()), "proxy": table.proxy,
                       "table_meta": table.meta}
    calib = calibration_data(loaded.tokenizer, settings.calib_text, settings.calib_windows, 0,
                             settings.window_len)
    space = SearchSpace([LayerConfig(), settings.option], name="layers study")
    table = build_table(loaded, space, make_proxy(settings.proxy), calib.calib, calib.digest,
                        log=log)
    return table, {"table": None, "proxy": settings.proxy, "calib_windows":
                   settings.calib_windows, "calib_digest": calib.digest}


def _measured(loaded: LoadedModel, names: list[str], settings: LayersSettings,
              done: dict, save: Callable[[], None], progress: bool) -> None:
    """KL of each named layer alone at the option, into ``done`` as they finish."""
    from tqdm.auto import tqdm

    from ..compress.apply import compressed_in_place
    from ..data import load_stream
    from ..evaluate import ReferenceCache, evaluate

    todo = [n for n in names if n not in done]
    if not todo:
        return
    windows = load_stream(loaded.tokenizer, settings.calib_text, "calib").windows(
        settings.measure_windows, settings.window_len, from_end=True)
    reference = ReferenceCache(loaded.model, windows).fill()
    # the other layers in float16, as every plan stores them (a KL floor of ~1e-7 nats)
    rest = {layer.name: LayerConfig() for layer in loaded.layers}
    for name in tqdm(todo, desc="layers (measured)", disable=not progress, leave=False):
        with compressed_in_place(loaded, {**rest, name: settings.option}, progress=False,
                                 codes=True) as model:
            done[name] = evaluate(model, windows, reference, progress=False).kl
        save()


def run_layers(models: list[ModelInput], settings: LayersSettings, out: Path,
               resume: bool = False, progress: bool = True, log=print,
               load: Callable[[str], LoadedModel] | None = None) -> dict:
    if len(models) < 1:
        raise AutocompressError("--models: give at least one model (two to compare them)")
    from ..compress.apply import uses_calibration

    if uses_calibration([settings.option]):
        raise AutocompressError("the layers study measures RTN formats (a layer alone, no "
                                "calibration): give an RTN option")
    if load is None:
        from ..model import load_model

        load = load_model
    protocol = {"models": [asdict(m) for m in models], **asdict(settings),
                "option": settings.option.to_dict(),
                "proxy_cost": "the table's predicted Δ LM loss (nats) of the layer alone at "
                              "the option",
                "measured": f"KL (nats/token) to the uncompressed model with the layer alone "
                            f"at the option, on the {settings.measure_windows} windows at the "
                            "calibration text's end" if settings.measure_windows else None}
    results = StudyFile(out / "layers.json", protocol, "models", resume)
    for model in models:
        entry = results.done.setdefault(model.spec, {})
        log(f"layers: {model.spec}")
        loaded = load(model.spec)
        if "proxy" not in entry:
            table, source = _table(loaded, model, settings, log)
            entry.update(name=loaded.identity.name, source=source,
                         n_blocks=1 + max(layer.block for layer in loaded.layers),
                         layers={layer.name: {"kind": layer.kind, "block": layer.block}
                                 for layer in loaded.layers},
                         proxy=option_costs(table, settings.option), measured={})
            results.save()
        if settings.measure_windows:
            every = settings.measure_every
            names = [layer.name for layer in loaded.layers if layer.block % every == 0]
            _measured(loaded, names, settings, entry["measured"], results.save, progress)
        del loaded
    _summarise(results.data, settings)
    results.save()
    atomic_write_text(out / "layers.csv", _csv(results.done))
    _figures(results.data, out / "figures")
    return results.data


def _summarise(data: dict, settings: LayersSettings) -> None:
    models = data["models"]
    for entry in models.values():
        kinds = {n: v["kind"] for n, v in entry["layers"].items()}
        blocks = {n: v["block"] for n, v in entry["layers"].items()}
        entry["profiles"] = {}
        for source in ("proxy", "measured"):
            costs = entry[source]
            if not costs:
                continue
            entry["profiles"][source] = {
                "kind": kind_profile(costs, kinds),
                "depth": depth_profile(costs, blocks, entry["n_blocks"], settings.depth_bins)}
        measured = entry["measured"]
        names = [n for n in entry["proxy"] if n in measured]
        entry["proxy_vs_measured"] = spearman([entry["proxy"][n] for n in names],
                                              [measured[n] for n in names])
    pairs = {}
    specs = list(models)
    for i, a in enumerate(specs):
        for b in specs[i + 1:]:
            row = {}
            for source in ("proxy", "measured"):
                pa, pb = (models[s]["profiles"].get(source) for s in (a, b))
                if not pa or not pb:
                    continue
                shared = [k for k in KINDS if k in pa["kind"] and k in pb["kind"]]
                row[source] = {"kind": spearman([pa["kind"][k] for k in shared],
                                                [pb["kind"][k] for k in shared]),
                               "depth": spearman(pa["depth"], pb["depth"])}
            pairs[f"{a} vs {b}"] = row
    data["correlations"] = pairs


def _csv(models: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["model", "layer", "kind", "block", "proxy_cost", "measured_kl"])
    for spec, entry in models.items():
        for name, info in entry["layers"].items():
            writer.writerow([spec, name, info["kind"], info["block"], entry["proxy"][name],
                             entry["measured"].get(name, "")])
    return buffer.getvalue()


def _figures(data: dict, directory: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(exist_ok=True)
    models = data["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 5), squeeze=False)
    for ax, (spec, entry) in zip(axes[0], models.items()):
        grid = np.full((entry["n_blocks"], len(KINDS)), np.nan)
        total = sum(entry["proxy"].values()) or 1.0
        for name, info in entry["layers"].items():
            grid[info["block"], KINDS.index(info["kind"])] = entry["proxy"][name] / total
        image = ax.imshow(np.log10(np.maximum(grid, 1e-6)), aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(KINDS)), KINDS)
        ax.set_ylabel("block")
        ax.set_title(f"{entry['name']}\nlog10 share of proxy cost", fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    atomic_save_figure(fig, directory / "layers.png")
    plt.close(fig)

    fig, (by_kind, by_depth) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, 2 * len(models))
    offset = 0
    for spec, entry in models.items():
        for source, style in (("proxy", "-"), ("measured", "--")):
            profile = entry["profiles"].get(source)
            if not profile:
                continue
            label = f"{entry['name']} ({source})"
            xs = [KINDS.index(k) + offset * width for k in profile["kind"]]
            by_kind.bar(xs, list(profile["kind"].values()), width=width, label=label)
            bins = len(profile["depth"])
            by_depth.plot([(i + 0.5) / bins for i in range(bins)], profile["depth"], style,
                          marker="o", label=label)
            offset += 1
    by_kind.set_xticks(range(len(KINDS)), KINDS)
    by_kind.set_ylabel("share of the model's total cost")
    option = data["protocol"]["option"]
    by_kind.set_title(f"by kind, at {option['bits']}-bit {option['method'].upper()}, group "
                      f"{option['group_size']}", fontsize=9)
    by_depth.set_xlabel("relative depth")
    by_depth.set_title("by depth", fontsize=9)
    for ax in (by_kind, by_depth):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_save_figure(fig, directory / "profiles.png")
    plt.close(fig)
