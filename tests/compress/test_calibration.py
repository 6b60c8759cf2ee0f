import pytest
import torch

from autocompress.compress.calibration import InputAccumulator


@pytest.mark.parametrize("full", [True, False])
def test_accumulated_statistics_are_the_float64_sums_of_the_batches(full):
    # each batch's product in float32, summed in float64, divided once: what GPTQ, Wanda and
    # the imatrix read, to the bit
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 17, 24, generator=g) * 10 for _ in range(4)]
    acc = InputAccumulator(24, full=full)
    for x in batches:
        acc.add(x)
    stats = acc.finish()
    rows = [x.reshape(-1, 24) for x in batches]
    n = sum(r.shape[0] for r in rows)
    xtx = sum((r.T @ r).double() for r in rows)
    assert stats.n_samples == n
    if full:
        assert torch.equal(stats.hessian, (xtx / n).float())
    else:
        assert stats.hessian is None
    assert torch.equal(stats.mean_square, (xtx.diagonal() / n).float()) if full else \
        torch.allclose(stats.mean_square, (xtx.diagonal() / n).float(), rtol=1e-6)
    assert torch.allclose(stats.act_norm, xtx.diagonal().sqrt().float(), rtol=1e-6)
    assert acc.xtx is None and acc.sq is None  # the float64 sums are released
