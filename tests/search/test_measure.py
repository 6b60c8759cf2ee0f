import pytest
import torch

from autocompress.compress.apply import compress_model
from autocompress.plan import LayerConfig
from autocompress.search.measure import PlanMeter


def test_meter_reuses_expensive_layers_without_changing_results(tiny_loaded):
    g = torch.Generator().manual_seed(0)
    vocab = tiny_loaded.model.config.vocab_size
    holdout, calib = torch.randint(0, vocab, (2, 32), generator=g), torch.randint(0, vocab, (2, 32), generator=g)
    meter = PlanMeter(tiny_loaded, holdout, calib)
    names = [l.name for l in tiny_loaded.layers]
    low_rank = {n: LayerConfig(bits=8, rank_ratio=0.5) for n in names}
    mixed = {**low_rank, names[0]: LayerConfig(bits=4)}
    first = meter.measure(low_rank)
    assert all((n, cfg) in meter._memo for n, cfg in low_rank.items())
    assert len(list(meter._memo.directory.glob("*.safetensors"))) == len(names)  # on disk
    second = meter.measure(mixed)
    fresh = PlanMeter(tiny_loaded, holdout, calib).measure(mixed)
    assert second["kl"] == pytest.approx(fresh["kl"], rel=1e-6)
    assert first["kl"] != second["kl"]


def test_the_memo_keeps_codes_only_and_rebuilds_the_same_weights(tiny_loaded):
    """A memo entry holds the stored codes, not their float32 decoding (a memo holds many
    configs per layer); a hit decodes them to exactly the weights of the first build."""
    g = torch.Generator().manual_seed(1)
    vocab = tiny_loaded.model.config.vocab_size
    holdout, calib = torch.randint(0, vocab, (1, 32), generator=g), torch.randint(0, vocab, (2, 32), generator=g)
    meter = PlanMeter(tiny_loaded, holdout, calib)
    configs = {l.name: LayerConfig(bits=3, group_size=32, method="gptq") for l in tiny_loaded.layers}
    configs[tiny_loaded.layers[1].name] = LayerConfig(bits=4, rank_ratio=0.5)
    with meter.compressed(configs) as model:
        built = _layer_weights(model, tiny_loaded)
    with meter.compressed(configs) as model:
        rebuilt = _layer_weights(model, tiny_loaded)
    assert len(built) == len(tiny_loaded.layers) + 1 and built.keys() == rebuilt.keys()
    assert [k for k in built if not torch.equal(built[k], rebuilt[k])] == []
    assert all((name, cfg) in meter._memo for name, cfg in configs.items())
    assert all(f is None for kept in meter._memo.values() for f in kept.factors)


def _layer_weights(model, loaded) -> dict[str, torch.Tensor]:
    """Every block linear's effective weight (a CodesLinear decodes its codes), a low-rank
    layer's two factors."""
    out = {}
    for layer in loaded.layers:
        module = model.get_submodule(layer.name)
        parts = [(".up", module.up), (".down", module.down)] if hasattr(module, "up") \
            else [("", module)]
        for suffix, sub in parts:
            out[layer.name + suffix] = sub.weight.detach().clone()
    return out


def test_memo_refuses_sequential_mode(tiny_loaded):
    with pytest.raises(ValueError, match="memo"):
        compress_model(tiny_loaded, {l.name: LayerConfig(bits=4) for l in tiny_loaded.layers},
                       mode="sequential", memo={})


def test_a_meter_keeping_only_diagonals_measures_imatrix_plans_and_refuses_gptq(tiny_loaded):
    """The search's meter keeps the full E[x xᵀ] only for layers its space may give GPTQ or
    low rank; a plan outside that promise is refused, not built from missing statistics."""
    g = torch.Generator().manual_seed(0)
    vocab = tiny_loaded.model.config.vocab_size
    holdout, calib = torch.randint(0, vocab, (2, 32), generator=g), torch.randint(0, vocab, (4, 32), generator=g)
    names = [l.name for l in tiny_loaded.layers]
    imatrix = {n: LayerConfig(gguf="q4_0", method="imatrix") for n in names}
    lean = PlanMeter(tiny_loaded, holdout, calib, hessian_layers=set())
    full = PlanMeter(tiny_loaded, holdout, calib)
    assert lean.measure(imatrix)["kl"] == pytest.approx(full.measure(imatrix)["kl"], rel=1e-3)
    assert all(s.hessian is None for s in lean._stats.values())
    with pytest.raises(ValueError, match="E\\[x xᵀ\\]"):
        lean.measure({**imatrix, names[0]: LayerConfig(bits=3, method="gptq")})


def test_the_memo_holds_at_most_its_bytes_dropping_the_least_recently_used(tiny_loaded):
    """A meter's memo is bounded in memory (level 2 reaches many configs per layer); what it
    drops is built again (no directory) or read back from disk, to the same weights, so the
    KL of a plan does not depend on the bound."""
    from autocompress.compress.memo import LayerMemo

    g = torch.Generator().manual_seed(2)
    vocab = tiny_loaded.model.config.vocab_size
    holdout, calib = torch.randint(0, vocab, (1, 32), generator=g), torch.randint(0, vocab, (2, 32), generator=g)
    names = [l.name for l in tiny_loaded.layers]
    plans = [{n: LayerConfig(bits=b, group_size=32, method="gptq") for n in names} for b in (3, 4)]
    free = PlanMeter(tiny_loaded, holdout, calib)
    capped = PlanMeter(tiny_loaded, holdout, calib)
    one_layer = max(l.out_features * l.in_features for l in tiny_loaded.layers)
    capped._memo = LayerMemo(max_bytes=3 * one_layer)  # a few layers' uint8 codes
    for plan in plans + plans:
        assert capped.measure(plan)["kl"] == free.measure(plan)["kl"]
        assert capped._memo.nbytes <= 3 * one_layer or len(capped._memo) == 1
    assert all((n, plan[n]) in free._memo for plan in plans for n in names)  # memory or disk
    assert len(capped._memo) < len(names)
    last = (names[-1], plans[1][names[-1]])
    assert last in capped._memo  # the most recent entry is kept


def test_a_memo_on_disk_gives_back_every_kind_of_entry_exactly(tiny_loaded, tmp_path):
    """What one worker's memo writes, another's reads: RTN/GPTQ codes, low-rank factors with
    masks, llama.cpp blocks, decoded to the same weights."""
    from autocompress.compress.memo import LayerMemo, for_memo, from_memo
    from autocompress.compress.weights import compress_weight

    weight = tiny_loaded.module(tiny_loaded.layers[4].name).weight.detach().float()
    configs = [LayerConfig(bits=3, group_size=32), LayerConfig(bits=4, rank_ratio=0.5),
               LayerConfig(bits=8, sparsity=0.5, prune_method="magnitude"),
               LayerConfig(gguf="q8_0")]
    writer, reader = LayerMemo(1 << 30, tmp_path), LayerMemo(1 << 30, tmp_path)
    for cfg in configs:
        built = compress_weight(weight, cfg)
        writer[("w", cfg)] = for_memo(built)
        assert ("w", cfg) in reader
        again = from_memo(reader[("w", cfg)])
        assert torch.equal(again.weight(), built.weight()), cfg
        assert [m is None for m in again.masks] == [m is None for m in built.masks]
    assert ("w", LayerConfig(bits=2)) not in reader


def test_plans_built_after_the_table_read_its_gptq_and_low_rank_results(tiny_loaded, tmp_path,
                                                                        monkeypatch):
    """The table computes every expensive option's real error; what it built goes to the memo
    beside the statistics, and a meter on those statistics never runs GPTQ or the SVD again
    (level 2's trials are then a rounding and a forward pass each)."""
    from autocompress.compress import gptq, lowrank
    from autocompress.compress.apply import hessian_layers
    from autocompress.compress.stats_store import StatsStore
    from autocompress.search.space import SearchSpace
    from autocompress.sensitivity.build import build_table
    from autocompress.sensitivity.fisher import FisherProxy

    space = SearchSpace([LayerConfig(bits=3, method="gptq"), LayerConfig(bits=4, rank_ratio=0.5),
                         LayerConfig(bits=4)])
    g = torch.Generator().manual_seed(4)
    vocab = tiny_loaded.model.config.vocab_size
    calib, holdout = torch.randint(0, vocab, (2, 32), generator=g), torch.randint(0, vocab, (1, 32), generator=g)
    store = StatsStore(tmp_path / "stats", tiny_loaded.layers, {"k": 1},
                       hessian_layers(tiny_loaded.layers, space.for_layer))
    build_table(tiny_loaded, space, FisherProxy(), calib, "d", cache=tmp_path / "t.json",
                progress=False, stats_store=store)
    names = [l.name for l in tiny_loaded.layers]
    plan = {n: space.options[i % 2] for i, n in enumerate(names)}
    expected = PlanMeter(tiny_loaded, holdout, calib).measure(plan)["kl"]  # its own statistics

    def not_again(*args, **kwargs):
        raise AssertionError("computed again")

    monkeypatch.setattr(gptq.GPTQ, "quantize", not_again)
    monkeypatch.setattr(lowrank, "low_rank_factors", not_again)
    monkeypatch.setattr("autocompress.compress.weights.low_rank_factors", not_again)
    assert PlanMeter(tiny_loaded, holdout, None, stats=store).measure(plan)["kl"] == expected
