"""A synthetic device profile whose figures make the maths easy to check by hand."""

from __future__ import annotations

import pytest

from autocompress.hardware.profile import DeviceProfile


def make_profile(**changes) -> DeviceProfile:
    raw = {
        "schema_version": 1, "name": "test-device", "description": "synthetic", "kind": "gpu",
        "engine": "test",
        "memory": {"capacity": "1GB", "usable_fraction": 0.5, "bandwidth_gbps": 1.0},
        "compute": {"peak_tflops": {"f16": 1.0}, "sparse_2_4": True, "float_dtype": "f16"},
        "formats": {"f16": {"efficiency": 1.0}, "q4": {"efficiency": 0.5},
                    "q8": {"efficiency": 1.0}},
        "fallback": {"efficiency": 0.25},
        "overhead": {"launch_us": 0.0, "block_us": 0.0},
        "sources": [{"field": "memory", "note": "synthetic"},
                    {"field": "compute", "note": "synthetic"}],
    }
    for dotted, value in changes.items():
        node = raw
        *path, last = dotted.split("__")
        for key in path:
            node = node[key]
        node[last] = value
    return DeviceProfile.model_validate(raw)


@pytest.fixture
def profile() -> DeviceProfile:
    return make_profile()
