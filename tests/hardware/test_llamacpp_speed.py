"""The llama.cpp decode model: the fit recovers per-type costs from files of mixed types, and
predicts a mixture it was not fitted on; profiles round-trip and bad ones are named."""

from __future__ import annotations

import pytest

from autocompress.errors import AutocompressError
from autocompress.hardware.llamacpp_speed import LlamaCppSpeed, fit


def _files(t0, cost, mixtures):
    return [{"seconds_per_token": t0 + sum(cost[t] * w for t, w in weights.items()),
             "weights": weights} for weights in mixtures]


def test_the_fit_recovers_relative_costs_and_predicts_an_unseen_mixture():
    cost = {"q8_0": 3e-10, "q4_0": 1.5e-10, "q5_0": 2e-10, "q4_k": 1.2e-10}  # s per weight
    embed, rest, down = 28_000_000, 70_000_000, 26_000_000
    mixtures = [{"q8_0": embed + rest + down}, {"q8_0": embed, "q4_0": rest + down},
                {"q8_0": embed, "q5_0": rest + down},
                {"q8_0": embed, "q5_0": rest, "q4_k": down}]  # a K type with its fallback
    t0, per_weight = fit(_files(0.004, cost, mixtures))
    # only differences to the reference are measurable: t0 absorbs its cost
    assert per_weight["q4_0"] == pytest.approx(cost["q4_0"] - cost["q8_0"], rel=1e-6)
    assert per_weight["q4_k"] == pytest.approx(cost["q4_k"] - cost["q8_0"], rel=1e-6)
    speed = LlamaCppSpeed("m", "h", "llama.cpp", "cpu", 2, "q8_0", t0, per_weight)
    unseen = {"q8_0": embed + 10_000_000, "q4_0": rest - 10_000_000, "q4_k": down}
    truth = 0.004 + sum(cost[t] * w for t, w in unseen.items())
    assert speed.predict_s(unseen) == pytest.approx(truth, rel=1e-6)
    with pytest.raises(AutocompressError, match="no figure for q2_k"):
        speed.predict_s({"q2_k": 5})


def test_a_profile_round_trips_and_a_foreign_file_is_named(tmp_path):
    speed = LlamaCppSpeed("m", "h", "llama.cpp", "cpu", 2, "q8_0", 0.01, {"q4_0": -1e-10},
                          files=[{"type": "q4_0", "tokens_per_s": 50.0}])
    path = tmp_path / "speed.yaml"
    path.write_text(speed.to_yaml())
    assert LlamaCppSpeed.load(path) == speed
    path.write_text("memory: {capacity: 8GB}\n")
    with pytest.raises(AutocompressError, match="not a llama.cpp speed profile"):
        LlamaCppSpeed.load(path)
