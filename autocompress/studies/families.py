"""`study families`: at equal bytes, which compression family wins?

At the footprint of uniform RTN b-bit (group 64, asymmetric; a fractional b is interpolated
between its neighbours' footprints) for each b of ``bits``, the search is run restricted to
one family at a time (the search's measured path: the exact proxy optimum and its checks
measured on held-out windows, the best kept) and the chosen plans compared:

- quantization only: 2/3/4/8 bits, groups of 64 and 128, RTN and GPTQ;
- pruning only, the remaining weights in 16 bits: unstructured 50-90% and 2:4;
- pruning only, the remaining weights in 8 bits: unstructured 30-90% and 2:4;
- low rank only, the factors in 16 bits: 12.5-75% of the parameters;
- the joint space (the search's default): all of them combined.

The surveys this tool grew from claim that below 4 bits quantized models beat pruned ones at
similar compression; this study measures that on the model it is given. A family whose
smallest plan does not fit a budget is recorded as such (its smallest footprint), not skipped.

Outputs in ``out``: families.json (protocol, one cell per family and budget), families.csv,
figures/families.png (KL against bytes, one line per family), and cells/FAMILY@BITS/ (each
search's own outputs). A cell is written as it finishes: a rerun with ``resume`` runs only the
missing ones; each family's sensitivity table is built once and reused across its budgets.
"""

from __future__ import annotations

import csv
import io
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from ..accounting import model_footprint
from ..errors import AutocompressError
from ..io_utils import atomic_save_figure, atomic_write_text
from ..model import LoadedModel
from ..plan import LayerConfig
from ..search.engine import SearchSettings, run_search
from ..search.exact import InfeasibleBudget
from ..search.space import SearchSpace
from .store import StudyFile

ENTRIES = ("families.json", "families.csv", "figures", "cells")
TIED = [["q", "k", "v"], ["gate", "up"]]  # as the joint space ties them


def family_spaces() -> dict[str, SearchSpace]:
    """Each family's options (tied as the joint space is)."""
    quant = [LayerConfig(bits=b, group_size=g, method=m)
             for b in (2, 3, 4, 8) for g in (64, 128) for m in ("rtn", "gptq")]
    prune16 = [LayerConfig(bits=16, sparsity=s) for s in (0.5, 0.7, 0.8, 0.9)] + \
        [LayerConfig(bits=16, pattern="2:4", sparsity=0.5)]
    prune8 = [LayerConfig(bits=8, sparsity=s) for s in (0.3, 0.5, 0.7, 0.8, 0.9)] + \
        [LayerConfig(bits=8, pattern="2:4", sparsity=0.5)]
    lowrank = [LayerConfig(bits=16, rank_ratio=r) for r in (0.125, 0.25, 0.375, 0.5, 0.75)]
    joint = SearchSpace.load("joint")
    return {"quantization": SearchSpace(quant, tied=TIED, name="quantization"),
            "pruning, 16-bit": SearchSpace(prune16, tied=TIED, name="pruning, 16-bit"),
            "pruning, 8-bit": SearchSpace(prune8, tied=TIED, name="pruning, 8-bit"),
            "low rank, 16-bit": SearchSpace(lowrank, tied=TIED, name="low rank, 16-bit"),
            "joint": joint}


@dataclass(frozen=True)
class FamiliesSettings:
    bits: tuple[float, ...] = (2.5, 3.0, 3.5, 4.0)
    families: tuple[str, ...] = ("quantization", "pruning, 16-bit", "pruning, 8-bit",
                                 "low rank, 16-bit", "joint")
    holdout_windows: int = 4
    calib_windows: int = 8
    window_len: int = 512
    context: int = 2048
    calib_text: str | None = None
    proxy: str = "fisher"


def uniform_footprint(loaded: LoadedModel, bits: float, context: int) -> int:
    """The footprint of uniform RTN ``bits`` (group 64, asymmetric); a fractional one lies
    between its neighbours' footprints in proportion."""
    def at(b: int) -> int:
        return model_footprint(loaded, {layer.name: LayerConfig(bits=b) for layer in loaded.layers},
                               context).total
    low = at(int(bits))
    return low if bits == int(bits) else round(low + (bits - int(bits)) * (at(int(bits) + 1) - low))


def run_families(loaded: LoadedModel, settings: FamiliesSettings, out: Path,
                 resume: bool = False, progress: bool = True, log=print) -> dict:
    spaces = family_spaces()
    unknown = [f for f in settings.families if f not in spaces]
    if unknown:
        raise AutocompressError(f"unknown famil{'y' if len(unknown) == 1 else 'ies'} "
                                f"{', '.join(unknown)}; choose from {', '.join(spaces)}")
    protocol = {"model": loaded.identity.name, "model_hash": loaded.identity.content_hash,
                **asdict(settings),
                "budget": "footprint of uniform RTN b-bit, group 64, asymmetric, at the context",
                "search": "the search's measured path per family: exact proxy optimum and its "
                          "checks, measured on the held-out windows; the best kept",
                "measure": f"KL to the uncompressed model and perplexity on "
                           f"{settings.holdout_windows} held-out windows of "
                           f"{settings.window_len} tokens at the calibration text's end"}
    results = StudyFile(out / "families.json", protocol, "cells", resume)
    cells_dir = out / "cells"
    for bits in settings.bits:
        budget = uniform_footprint(loaded, bits, settings.context)
        for family in settings.families:
            key = f"{family}@{bits:g}"
            if key in results.done:
                continue
            log(f"families: {key} at {budget:,} bytes")
            cell = cells_dir / _dirname(key)
            _reuse_table(cells_dir, family, cell)
            results.done[key] = _cell(loaded, spaces[family], settings, budget, cell,
                                       progress, log) | {"family": family, "bits": bits,
                                                         "budget_bytes": budget}
            results.save()
    atomic_write_text(out / "families.csv", _csv(results.done))
    _figure(results.data, out / "figures" / "families.png")
    return results.data


def _dirname(key: str) -> str:
    return key.replace(", ", "-").replace(" ", "-")


def _reuse_table(cells_dir: Path, family: str, cell: Path) -> None:
    """A family's sensitivity table does not depend on the budget: a cell starts from another
    cell's cache of the same family (its key still checked when read)."""
    if (cell / "sensitivity.cache.json").is_file() or not cells_dir.is_dir():
        return
    for other in cells_dir.glob(f"{_dirname(family)}@*/sensitivity.cache.json"):
        cell.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(other, cell / "sensitivity.cache.json")
        return


def _cell(loaded, space, settings, budget, cell: Path, progress, log) -> dict:
    cell.mkdir(parents=True, exist_ok=True)
    search = SearchSettings(budget=budget, context=settings.context, n_calib=settings.calib_windows,
                            n_holdout=settings.holdout_windows, window_len=settings.window_len,
                            calib_text=settings.calib_text, proxy=settings.proxy)
    try:
        result = run_search(loaded, space, search, out_dir=cell, progress=progress, log=log)
    except InfeasibleBudget as exc:
        return {"feasible": False, "note": str(exc)}
    chosen = result.chosen
    counts: dict[str, int] = {}
    for cfg in chosen.configs.values():
        counts[cfg.short()] = counts.get(cfg.short(), 0) + 1
    return {"feasible": True, "total_bytes": chosen.footprint.total,
            "kl": chosen.measured["kl"], "ppl": chosen.measured["ppl"],
            "chosen": chosen.label, "formats": dict(sorted(counts.items(), key=lambda kv: -kv[1]))}


def _csv(cells: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["family", "bits", "budget_bytes", "feasible", "total_bytes", "kl", "ppl",
                     "chosen"])
    for cell in cells.values():
        writer.writerow([cell["family"], cell["bits"], cell["budget_bytes"], cell["feasible"],
                         cell.get("total_bytes", ""), cell.get("kl", ""), cell.get("ppl", ""),
                         cell.get("chosen", "")])
    return buffer.getvalue()


def _figure(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_family: dict[str, list] = {}
    for cell in data["cells"].values():
        if cell["feasible"]:
            by_family.setdefault(cell["family"], []).append((cell["bits"], cell["kl"]))
    for family, points in by_family.items():
        points.sort()
        ax.plot([b for b, _ in points], [k for _, k in points], marker="o", label=family)
    ax.set_xlabel("budget: the bytes of uniform b-bit")
    ax.set_ylabel("KL to uncompressed (nats/token)")
    ax.set_yscale("log")
    ax.set_title(f"{data['protocol']['model']}: the best plan of each family")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)
