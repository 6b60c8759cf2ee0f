import torch

from autocompress.search.space import SearchSpace
from autocompress.sensitivity.build import build_table
from autocompress.sensitivity.fisher import FisherProxy
from autocompress.sensitivity.fisher import fisher_diagonal


def test_fisher_is_mean_squared_gradient_per_window(tiny_loaded):
    model = tiny_loaded.model
    layers = tiny_loaded.layers[:3]
    windows = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
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
