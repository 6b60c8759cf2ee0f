"""Heat map of a sensitivity table: layers (rows, forward order) × options (columns).

Colour is log10 of the cost; cells without a positive finite cost (an option the layer does not
have, a zero cost such as fp16, or an infinite one) are left grey. Layers can have different
option lists (per-kind options, pinned layers), so the columns are the distinct options of the
whole table in order of first appearance, and each layer's costs go under their own option.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..io_utils import atomic_save_figure
from ..model import KIND_BY_SUFFIX
from ..plan import LayerConfig
from .table import SensitivityTable

_BLOCK = re.compile(r"\.layers\.(\d+)\.")


def layer_label(name: str) -> str:
    """``model.layers.12.mlp.down_proj`` -> ``12.down``; other names are kept as they are."""
    match = _BLOCK.search(name + ".")
    suffix = name.rsplit(".", 1)[-1]
    if match is None:
        return name
    return f"{match.group(1)}.{KIND_BY_SUFFIX.get(suffix, suffix)}"


def heatmap_matrix(table: SensitivityTable) -> tuple[np.ndarray, list[LayerConfig]]:
    """(costs [layers, distinct options] with NaN where a layer lacks the option, columns)."""
    columns: list[LayerConfig] = []
    index: dict[LayerConfig, int] = {}
    for opts in table.options:
        for cfg in opts:
            if cfg not in index:
                index[cfg] = len(columns)
                columns.append(cfg)
    matrix = np.full((len(table.layers), len(columns)), np.nan)
    for row, (opts, costs) in enumerate(zip(table.options, table.cost)):
        for cfg, cost in zip(opts, costs):
            matrix[row, index[cfg]] = cost
    return matrix, columns


def save_heatmap(table: SensitivityTable, path: str | Path, title: str | None = None) -> Path:
    """Write the table's heat map as a PNG at ``path`` (atomically); return the path."""
    # the Agg canvas directly: no pyplot, no display, and the caller's backend left alone
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    matrix, columns = heatmap_matrix(table)
    n_rows, n_cols = matrix.shape
    with np.errstate(divide="ignore", invalid="ignore"):
        valid = np.isfinite(matrix) & (matrix > 0)
        logs = np.where(valid, np.log10(np.where(valid, matrix, 1.0)), np.nan)
    data = np.ma.masked_invalid(logs)

    # ~0.11 inch per row keeps 6-point labels apart at 210 rows (a 25-inch-tall figure)
    row_font = 6 if n_rows > 60 else 8
    col_font = 7 if n_cols > 12 else 8
    height = min(max(4.0, 0.11 * n_rows + 2.5), 60.0)
    width = min(max(5.0, 0.32 * max(n_cols, 1) + 3.5), 40.0)
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")
    if valid.any():
        vmin, vmax = float(np.nanmin(logs)), float(np.nanmax(logs))
        if vmin == vmax:
            vmin, vmax = vmin - 0.5, vmax + 0.5
    else:
        vmin, vmax = 0.0, 1.0
    image = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap,
                      vmin=vmin, vmax=vmax)
    ax.set_yticks(range(n_rows))
    ax.set_yticklabels([layer_label(name) for name in table.layers], fontsize=row_font)
    ax.set_xticks(range(n_cols))
    ax.set_xticklabels([cfg.short() for cfg in columns], fontsize=col_font, rotation=55,
                       ha="left", va="bottom", rotation_mode="anchor")
    ax.xaxis.set_ticks_position("top")
    ax.xaxis.set_label_position("top")
    ax.tick_params(axis="x", labeltop=True, labelbottom=False, length=2)
    ax.tick_params(axis="y", length=2)
    ax.set_ylabel("layer (forward order)", fontsize=8)
    bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02, aspect=max(20, n_rows // 4))
    bar.set_label(f"log10 cost ({table.proxy}, nats); grey: none / zero", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if title is None:
        title = f"{table.proxy} sensitivity: {n_rows} layers x {n_cols} options"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / height))

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_figure(fig, path)
    return path


__all__ = ["save_heatmap", "heatmap_matrix", "layer_label"]
