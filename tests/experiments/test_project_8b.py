"""The 8B projection's arithmetic: the shapes give the published parameter counts, and the
projection scales a measured entry by the stated ratios and rates (experiments/project_8b.py)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))
project_8b = importlib.import_module("project_8b")
sys.path.remove(str(EXPERIMENTS))


def test_the_shapes_give_the_models_parameter_counts():
    # Llama-3.1-8B: 8,030,261,248 parameters with its 65 RMSNorm weights of 4096 (model card);
    # SmolLM2-135M: 134,515,008 with its 61 norms of 576 (the bundled model, tied head)
    assert project_8b.LLAMA_8B.params() + 65 * 4096 == 8_030_261_248
    assert project_8b.SMOLLM2.params() + 61 * 576 == 134_515_008


def test_a_projection_scales_each_stage_by_its_ratios_and_rates():
    entry = {"model": "m", "params": project_8b.QWEN_1_5B.params(),
             "timings_s": {"sensitivity_s": 600.0, "level2_s": 1200.0, "level3_s": 300.0},
             "peak_pss_bytes": 4 * 2**30}
    ceiling = {"forwards": 6, "together_s": [10.0, 12.0]}
    got = project_8b.project(entry, ceiling, parallel_efficiency=0.8)
    lo, hi = got["forward_ratio"], got["factorization_ratio"]
    assert 4.5 < lo < 5.2 and 5.5 < hi < 6.5  # the 8B does ~5-6x the 1.5B's work
    assert got["cpu_s"]["level2_s"] == pytest.approx([1200 * lo, 1200 * hi], rel=1e-3)
    # this CPU's rate: 12 forwards of SmolLM2 (2 x 134.5M x 512 FLOP each) in 12 s
    assert got["cpu_rate_gflops"] == pytest.approx(12 * 2 * 134.48e6 * 512 / 12 / 1e9, rel=1e-3)
    a = project_8b.ASSUMED
    forward = a["bf16_peak_tflops"] * 1e3 * a["forward_efficiency"] / got["cpu_rate_gflops"]
    assert got["one_gpu_s"]["level3_s"][1] == pytest.approx(300 * hi / forward, rel=1e-3)
    # eight GPUs divide the levels, not the table
    assert got["eight_gpus_s"]["sensitivity_s"] == got["one_gpu_s"]["sensitivity_s"]
    assert got["eight_gpus_s"]["level2_s"][0] == pytest.approx(
        got["one_gpu_s"]["level2_s"][0] / (8 * 0.8))
    # bf16 weights of 8.03B parameters and a working set below 24 GB
    assert got["gpu_weights_bytes"] == 2 * project_8b.LLAMA_8B.params()
    assert got["gpu_weights_bytes"] < got["gpu_memory_bytes"] < 24e9
