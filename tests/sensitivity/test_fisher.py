import torch

from autocompress.search.space import SearchSpace
from autocompress.sensitivity.build import build_table
from autocompress.sensitivity.fisher import FisherProxy
from autocompress.sensitivity.fisher import fisher_diagonal


def test_fisher_is_mean_squared_gradient_per_window(tiny_loaded):
    model = tiny_loaded.model
    layers = tiny_loaded.layers[:3]
    windows = torch.randint(0, model.config.vocab_size, (3, 16),
                            generator=torch.Generator().manual_seed(0))
    fisher = fisher_diagonal(model, layers, windows, progress=False)
    weight = model.get_submodule(layers[2].name).weight
    expected = torch.zeros_like(weight)
    for w in windows:
        model.zero_grad()
        weight.requires_grad_(True)
        model(w[None], labels=w[None]).loss.backward()
        expected += weight.grad.square()
        weight.grad = None
    weight.requires_grad_(False)
    assert torch.allclose(fisher[layers[2].name], expected / 3, rtol=1e-4, atol=1e-12)
    assert not any(p.requires_grad for p in model.parameters())


def test_fisher_table_costs_fall_with_bits(tiny_loaded, tmp_path):
    windows = torch.randint(0, tiny_loaded.model.config.vocab_size, (2, 16),
                            generator=torch.Generator().manual_seed(0))
    table = build_table(tiny_loaded, SearchSpace.bits_only([2, 4, 8]), FisherProxy(), windows,
                        "test", cache=tmp_path / "cache.json", progress=False)
    assert len(table.layers) == len(tiny_loaded.layers)
    for costs, sizes in zip(table.cost, table.bytes):
        assert costs[0] > costs[1] > costs[2] >= 0
        assert sizes[0] < sizes[1] < sizes[2]


def _windows(tiny_loaded, n=3, length=24, seed=2):
    return torch.randint(0, tiny_loaded.model.config.vocab_size, (n, length),
                         generator=torch.Generator().manual_seed(seed))


def test_the_fisher_taken_block_by_block_is_the_whole_model_s(tiny_loaded):
    """Sequential onloading's backward (each block run again on its saved inputs, given its
    output's gradient) gives the whole model's Fisher and statistics bit for bit, one block at
    a time from the last, and leaves no gradient flag set."""
    from autocompress.compress.calibration import collect_stats
    from autocompress.sensitivity.fisher import fisher_by_block

    model, layers = tiny_loaded.model, tiny_loaded.layers
    windows = _windows(tiny_loaded)
    expected = fisher_diagonal(model, layers, windows, progress=False)
    expected_stats = collect_stats(model, layers, windows, progress=False)
    seen, got, got_stats = [], {}, {}

    def on_block(index, sums, stats):
        seen.append(index)
        assert {layer.block for layer in layers if layer.name in sums} == {index}
        got.update(sums)
        got_stats.update(stats)

    fisher_by_block(model, layers, windows, on_block, progress=False)
    assert seen == sorted({layer.block for layer in layers}, reverse=True)
    assert got.keys() == expected.keys()
    assert [name for name in expected if not torch.equal(got[name], expected[name])] == []
    for name, stats in expected_stats.items():
        assert torch.equal(got_stats[name].hessian, stats.hessian), name
        assert got_stats[name].n_samples == stats.n_samples
    assert not any(p.requires_grad for p in model.parameters())


def test_a_table_built_block_by_block_is_the_table_built_in_memory(tiny_loaded, tmp_path):
    """The Fisher table of the joint space (GPTQ, Wanda, low rank: statistics too) is the same
    from the sequential path as from the whole-model one; the statistics it took are written
    to the store."""
    from autocompress.compress.apply import hessian_layers
    from autocompress.compress.stats_store import StatsStore

    space = SearchSpace.load("joint")
    windows = _windows(tiny_loaded, n=2, length=32)
    in_memory = FisherProxy()
    in_memory.blockwise = False  # the whole model's backward, the statistics in one pass
    reference = build_table(tiny_loaded, space, in_memory, windows, "test",
                            cache=tmp_path / "memory.json", progress=False)
    store = StatsStore(tmp_path / "stats", tiny_loaded.layers, {"test": 1},
                       hessian_layers(tiny_loaded.layers, space.for_layer))
    blockwise = build_table(tiny_loaded, space, FisherProxy(), windows, "test",
                            cache=tmp_path / "blocks.json", progress=False, stats_store=store)
    assert blockwise.layers == reference.layers
    assert blockwise.cost == reference.cost and blockwise.bytes == reference.bytes
    assert store.complete


def test_the_blockwise_fisher_hands_back_the_embedding_head_and_blocks(tiny_loaded,
                                                                        monkeypatch):
    """The block-by-block Fisher pass hands back (residency.release_module) the embedding
    once the forward has read it, the head once its gradients are taken, and every block once
    its rows are done: the pages of the 1.5B model's untied head and embedding alone are
    1.9 GB in float32. (Page residency itself is tested in test_residency.py; which pages
    stay mapped after a release also depends on the kernel's fault-around.)"""
    import autocompress.residency as residency
    from autocompress.sensitivity.fisher import fisher_by_block

    released = []
    real = residency.release_module
    monkeypatch.setattr(residency, "release_module",
                        lambda module: released.append(module) or real(module))
    model = tiny_loaded.model
    fisher_by_block(model, tiny_loaded.layers, _windows(tiny_loaded), lambda *a: None,
                    progress=False)
    ids = [id(m) for m in released]
    assert id(model.get_input_embeddings()) in ids and id(model.get_output_embeddings()) in ids
    blocks = {id(b) for b in model.model.layers}
    assert sum(i in blocks for i in ids) == 2 * len(blocks)  # after the forward, after the rows
