"""The sensitivity table's cache: malformed rows are found, said, and computed again."""

import json
import math

import numpy as np
import pytest

from autocompress.data import calibration_data
from autocompress.search.space import SearchSpace
from autocompress.sensitivity.build import build_table, make_proxy


@pytest.mark.parametrize("damage", [
    lambda row: {"cost": row["cost"][:-1], "bytes": row["bytes"]},        # one option short
    lambda row: {"cost": [float("nan")] * len(row["cost"]), "bytes": row["bytes"]},
    lambda row: {"cost": ["x"] * len(row["cost"]), "bytes": row["bytes"]},
    lambda row: {"cost": row["cost"], "bytes": [0] * len(row["bytes"])},
    lambda row: "not a row",
])
def test_a_malformed_cache_row_is_recomputed_and_said(tiny_loaded, tmp_path, damage):
    space = SearchSpace.bits_only([2, 4, 8])
    calib = calibration_data(tiny_loaded.tokenizer, None, 2, 0, 32)
    cache = tmp_path / "cache.json"
    quiet = lambda m: None  # noqa: E731
    first = build_table(tiny_loaded, space, make_proxy("fisher"), calib.calib, calib.digest,
                        cache=cache, progress=False, log=quiet)
    data = json.loads(cache.read_text())
    victim = tiny_loaded.layers[3].name
    data["rows"][victim] = damage(data["rows"][victim])
    cache.write_text(json.dumps(data, allow_nan=True))
    said = []
    again = build_table(tiny_loaded, space, make_proxy("fisher"), calib.calib, calib.digest,
                        cache=cache, progress=False, log=said.append)
    assert any("malformed row" in m and victim in m for m in said), said
    assert np.allclose(again.cost, first.cost, rtol=1e-6, atol=0)
    assert again.bytes == first.bytes
    assert all(math.isfinite(c) for row in again.cost for c in row)
