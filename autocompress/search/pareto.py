"""What a search leaves behind: its plans' trade-offs as a Pareto front (JSON, CSV and a plot).

Every objective is minimised: quality (KL to the uncompressed model, or the best estimate of it
that was taken), bytes, and, when a device was given, minus the predicted tokens/s.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..io_utils import atomic_save_figure, atomic_write_text

CSV_COLUMNS = ("label", "source", "total_bytes", "predicted", "kl_fast", "kl", "ppl",
               "tokens_per_s", "on_front", "chosen")
BASELINE_SOURCES = ("uniform", "recipe")
MARKERS = {"proxy": "o", "optuna": "^", "tune": "v", "uniform": "s", "recipe": "D"}


def non_dominated(points: list[dict], objectives: list[str]) -> list[int]:
    """Indices (ascending) of the points no other point dominates, all objectives minimised.

    A point lacking an objective (None, missing or NaN) cannot be compared and is left out;
    equal points do not dominate each other, so both are kept."""
    def usable(p: dict) -> bool:
        return all(p.get(o) is not None and not math.isnan(p[o]) for o in objectives)

    idx = [i for i, p in enumerate(points) if usable(p)]
    if not idx:
        return []
    values = np.array([[float(points[i][o]) for o in objectives] for i in idx])
    front = []
    for row, i in enumerate(idx):
        # dominated: some point is no worse in every objective and better in one
        no_worse = np.all(values <= values[row], axis=1)
        better = np.any(values < values[row], axis=1)
        if not np.any(no_worse & better):
            front.append(i)
    return front


def quality(record: dict) -> float | None:
    """The best-fidelity figure a record has: measured KL, then low-fidelity KL, then the proxy.
    All are in nats of mean next-token loss, so they share one axis."""
    for key in ("kl", "kl_fast", "predicted"):
        if record.get(key) is not None:
            return float(record[key])
    return None


def objective_points(records: list[dict]) -> tuple[list[dict], list[str]]:
    """Records -> points for ``non_dominated``; speed is an objective only when some record has it."""
    objectives = ["quality", "total_bytes"]
    if any(r.get("tokens_per_s") is not None for r in records):
        objectives.append("neg_tokens_per_s")
    points = [{"quality": quality(r), "total_bytes": r.get("total_bytes"),
               "neg_tokens_per_s": None if r.get("tokens_per_s") is None
               else -float(r["tokens_per_s"])} for r in records]
    return points, objectives


def write_pareto(out_dir: str | Path, records: list[dict], title: str) -> dict[str, Path]:
    """Write pareto.json, pareto.csv and pareto.png under ``out_dir`` (each atomically)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    points, objectives = objective_points(records)
    front = non_dominated(points, objectives)
    on_front = set(front)

    paths = {"json": out_dir / "pareto.json", "csv": out_dir / "pareto.csv",
             "png": out_dir / "pareto.png"}
    doc = {"title": title, "objectives": objectives, "front": [records[i] for i in front],
           "all": records}
    atomic_write_text(paths["json"], json.dumps(doc, indent=2, default=_plain) + "\n")

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for i, r in enumerate(records):
        row = {**r, "on_front": i in on_front, "chosen": bool(r.get("chosen"))}
        writer.writerow(["" if row.get(c) is None else row[c] for c in CSV_COLUMNS])
    atomic_write_text(paths["csv"], buf.getvalue())

    _plot(paths["png"], records, points, objectives, front, title)
    return paths


def _plain(value: Any) -> Any:
    """numpy scalars (and Paths) as JSON values: searches often hand those over."""
    return value.item() if hasattr(value, "item") else str(value)


def _plot(path: Path, records: list[dict], points: list[dict], objectives: list[str],
          front: list[int], title: str) -> None:
    # the Agg canvas directly: no pyplot, no display, and the caller's backend left alone
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(8.5, 5.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    shown = [i for i, p in enumerate(points)
             if p["quality"] is not None and records[i].get("total_bytes") is not None]
    mb = {i: records[i]["total_bytes"] / 1e6 for i in shown}
    q = {i: points[i]["quality"] for i in shown}

    speeds = [records[i]["tokens_per_s"] for i in shown if records[i].get("tokens_per_s") is not None]
    cmap = matplotlib.colormaps["viridis"]
    lo, hi = (min(speeds), max(speeds)) if speeds else (0.0, 1.0)
    norm = Normalize(lo, hi) if hi > lo else Normalize(lo - 0.5, hi + 0.5)  # one speed: a range
    handles = []
    for source in dict.fromkeys(records[i].get("source", "?") for i in shown):
        mine = [i for i in shown if records[i].get("source", "?") == source]
        marker = MARKERS.get(source, "o")
        size = 55 if source in BASELINE_SOURCES else 28
        timed = [i for i in mine if records[i].get("tokens_per_s") is not None]
        untimed = [i for i in mine if records[i].get("tokens_per_s") is None]
        if timed:
            ax.scatter([mb[i] for i in timed], [q[i] for i in timed], marker=marker, s=size,
                       c=[records[i]["tokens_per_s"] for i in timed], cmap=cmap, norm=norm,
                       edgecolors="black", linewidths=0.4, zorder=3)
        if untimed:
            ax.scatter([mb[i] for i in untimed], [q[i] for i in untimed], marker=marker, s=size,
                       color="0.55", edgecolors="black", linewidths=0.4, zorder=3)
        handles.append(Line2D([], [], linestyle="", marker=marker, color="0.55",
                              markeredgecolor="black", label=source))
        if source in BASELINE_SOURCES:
            middle = (min(mb.values()) + max(mb.values())) / 2
            for i in mine:  # a recipe's long label: its name, without the explanation;
                # written towards the middle so it stays inside the axes
                left = mb[i] > middle
                ax.annotate(str(records[i].get("label", "")).split(" (")[0], (mb[i], q[i]),
                            xytext=(-6 if left else 6, 4), textcoords="offset points",
                            ha="right" if left else "left", fontsize=7)

    # The step line is the memory-quality front (what this 2-D plot can show); with speed as a
    # third objective, points on the full front are ringed as well.
    flat = [shown[k] for k in non_dominated([points[i] for i in shown],
                                            ["quality", "total_bytes"])]
    flat.sort(key=lambda i: (mb[i], q[i]))
    if flat:
        ax.step([mb[i] for i in flat], [q[i] for i in flat], where="post", color="tab:red",
                linewidth=1.2, zorder=2)
        handles.append(Line2D([], [], color="tab:red", label="memory-quality front"))
    if "neg_tokens_per_s" in objectives:
        ringed = [i for i in front if i in mb]
        ax.scatter([mb[i] for i in ringed], [q[i] for i in ringed], s=110, facecolors="none",
                   edgecolors="tab:red", linewidths=1.0, zorder=4)
        handles.append(Line2D([], [], linestyle="", marker="o", markerfacecolor="none",
                              markeredgecolor="tab:red", markersize=9,
                              label="Pareto front (with tokens/s)"))

    chosen = [i for i in shown if records[i].get("chosen")]
    if chosen:
        ax.scatter([mb[i] for i in chosen], [q[i] for i in chosen], marker="*", s=320,
                   color="gold", edgecolors="black", linewidths=0.9, zorder=5)
        handles.append(Line2D([], [], linestyle="", marker="*", color="gold", markersize=14,
                              markeredgecolor="black",
                              label=f"chosen: {records[chosen[0]].get('label', '')}"[:60]))

    values = list(q.values())
    if values and min(values) > 0 and max(values) > 10 * min(values):
        ax.set_yscale("log")
    if speeds:
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.02)
        bar.set_label("predicted tokens/s")
    ax.set_xlabel("total memory (MB)")
    ax.set_ylabel(_quality_label([records[i] for i in shown]))
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="both", alpha=0.25)
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="best")
    if not shown:
        ax.text(0.5, 0.5, "no plan has a quality figure", ha="center", transform=ax.transAxes)
    fig.tight_layout()

    atomic_save_figure(fig, path)


def _quality_label(records: list[dict]) -> str:
    """Say which figure the y axis holds, and when lower-fidelity ones stand in for KL."""
    kinds = {"kl" if r.get("kl") is not None else "kl_fast" if r.get("kl_fast") is not None
             else "predicted" for r in records}
    if kinds <= {"predicted"}:
        return "predicted loss increase (proxy, nats)"
    if kinds == {"kl_fast"}:
        return "KL to the uncompressed model (nats, low fidelity)"
    stand_ins = [name for key, name in (("kl_fast", "low-fidelity KL"),
                                        ("predicted", "proxy estimate")) if key in kinds]
    label = "KL to the uncompressed model (nats)"
    return label + (f"\n({' / '.join(stand_ins)} where not measured)" if stand_ins else "")


__all__ = ["non_dominated", "quality", "write_pareto"]
