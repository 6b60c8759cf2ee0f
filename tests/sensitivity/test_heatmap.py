"""The sensitivity heat map: a valid PNG of plausible size, labelled rows, an atomic write."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from autocompress.plan import LayerConfig
from autocompress.sensitivity.heatmap import heatmap_matrix, layer_label, save_heatmap
from autocompress.sensitivity.table import SensitivityTable

KINDS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _table(blocks: int, options: list[LayerConfig], seed: int = 0) -> SensitivityTable:
    names = [f"model.layers.{b}.{k}" for b in range(blocks) for k in KINDS]
    rng = np.random.default_rng(seed)
    per_layer = [list(options) for _ in names]
    cost = [list(10 ** rng.uniform(-7, 0, len(options))) for _ in names]
    cost[0][0] = 0.0  # masked: zero
    cost[1][-1] = float("inf")  # masked: infinite
    per_layer[2], cost[2] = options[:2], cost[2][:2]  # a layer with fewer options (padded)
    return SensitivityTable(layers=names, options=per_layer, cost=cost,
                            bytes=[[1] * len(o) for o in per_layer], proxy="fisher")


OPTIONS = [LayerConfig(bits=2), LayerConfig(bits=3, group_size=-1),
           LayerConfig(bits=4, sparsity=0.5, pattern="2:4"), LayerConfig(bits=8, rank_ratio=0.5),
           LayerConfig(bits=16)]


def test_labels_and_matrix():
    assert layer_label("model.layers.12.mlp.down_proj") == "12.down"
    assert layer_label("model.layers.0.self_attn.q_proj") == "0.q"
    assert layer_label("lm_head") == "lm_head"
    table = _table(1, OPTIONS)
    table.options[3] = [OPTIONS[4], OPTIONS[0]]  # other order: costs follow their option
    table.cost[3] = [5.0, 7.0]
    matrix, columns = heatmap_matrix(table)
    assert columns == OPTIONS and matrix.shape == (7, 5)
    assert matrix[3, 4] == 5.0 and matrix[3, 0] == 7.0 and np.isnan(matrix[3, 1])
    assert np.isnan(matrix[2, 2:]).all()


def test_heatmap_png_for_210_layers(tmp_path):
    table = _table(30, OPTIONS)  # 210 layers, as SmolLM2-135M
    out = save_heatmap(table, tmp_path / "sub" / "table.png", title="fisher, test")
    assert out == tmp_path / "sub" / "table.png"
    assert out.read_bytes()[:8] == PNG_MAGIC
    with Image.open(out) as image:
        image.verify()
    with Image.open(out) as image:
        width, height = image.size
    assert height >= 210 * 10  # at least ~10 pixels per layer row: labels stay readable
    assert 400 <= width < height
    assert sorted(p.name for p in out.parent.iterdir()) == ["table.png"]  # no temp files


def test_heatmap_write_is_atomic(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    target = tmp_path / "table.png"
    save_heatmap(_table(2, OPTIONS), target)
    before = target.read_bytes()

    def broken_savefig(self, fname, *args, **kwargs):
        if hasattr(fname, "write"):  # a buffer
            fname.write(PNG_MAGIC + b"half a picture")
        else:
            with open(fname, "wb") as fh:
                fh.write(PNG_MAGIC + b"half a picture")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        save_heatmap(_table(3, OPTIONS, seed=1), target)
    assert target.read_bytes() == before  # the old picture is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.png"]  # and no temp file left


def test_heatmap_with_no_positive_cost(tmp_path):
    table = _table(1, OPTIONS[:2])
    table.cost = [[0.0] * len(c) for c in table.cost]
    out = save_heatmap(table, tmp_path / "zeros.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
