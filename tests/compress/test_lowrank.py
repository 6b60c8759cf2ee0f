import pytest
import torch

from autocompress.compress.lowrank import low_rank_factors, rank_for, truncated_factors
from autocompress.errors import AutocompressError


def random_weight(out_features=24, in_features=40, seed=0):
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))


def correlated_inputs(in_features=40, n=1024, seed=1):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(in_features, in_features, generator=g)
    return torch.randn(n, in_features, generator=g) @ mixing


def test_rank_for():
    assert rank_for(4096, 4096, 0.5) == 1024
    assert rank_for(4096, 11008, 0.25) == int(0.25 * 4096 * 11008 / (4096 + 11008))
    assert rank_for(24, 40, 0.001) == 1
    # the factors never hold more than rank_ratio of the dense parameters
    r = rank_for(24, 40, 0.6)
    assert r * (24 + 40) <= 0.6 * 24 * 40 < (r + 1) * (24 + 40)


def test_shapes_and_dtype():
    w = random_weight()
    A, B = low_rank_factors(w, 0.5)
    r = rank_for(24, 40, 0.5)
    assert A.shape == (24, r) and B.shape == (r, 40)
    assert A.dtype == B.dtype == torch.float32


@pytest.mark.parametrize("whiten", [False, True])
def test_exact_at_full_rank(whiten):
    w = random_weight()
    H = None
    if whiten:
        x = correlated_inputs()
        H = x.T @ x / x.shape[0]
    A, B = truncated_factors(w, min(w.shape), H)
    assert torch.allclose(A @ B, w, atol=1e-4)


def test_exact_for_a_matrix_of_low_rank():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(24, 5, generator=g) @ torch.randn(5, 40, generator=g)
    A, B = low_rank_factors(w, 0.5)  # rank 7 >= 5
    assert torch.allclose(A @ B, w, atol=1e-4)


@pytest.mark.parametrize("rank", [1, 5, 12])
def test_eckart_young(rank):
    w = random_weight()
    A, B = truncated_factors(w, rank)
    sigma = torch.linalg.svdvals(w.double())
    error = float((w.double() - (A @ B).double()).pow(2).sum())
    assert error == pytest.approx(float(sigma[rank:].pow(2).sum()), rel=1e-5)


def test_factors_are_balanced():
    A, B = truncated_factors(random_weight(), 6)
    # A = U√Σ and B = √Σ Vᵀ: AᵀA = BBᵀ = Σ
    assert torch.allclose(A.T @ A, B @ B.T, atol=1e-4)


def test_whitening_lowers_output_error_on_correlated_inputs():
    w, x = random_weight(), correlated_inputs()
    H = x.T @ x / x.shape[0]
    plain = low_rank_factors(w, 0.4)
    whitened = low_rank_factors(w, 0.4, H=H)

    def output_error(factors):
        A, B = factors
        return float(((w - A @ B) @ x.T).pow(2).sum())

    assert output_error(whitened) < 0.9 * output_error(plain)
    # and the whitened weight error is larger: it spends the rank where the inputs are
    assert (w - whitened[0] @ whitened[1]).norm() > (w - plain[0] @ plain[1]).norm()


def test_whitened_b_decorrelates_the_inputs_of_a():
    # B H Bᵀ = √Σ Vᵀ S⁻¹ H S⁻ᵀ V √Σ ≈ Σ_r: A's inputs B x are uncorrelated (up to damping)
    w, x = random_weight(), correlated_inputs()
    H = x.T @ x / x.shape[0]
    _, B = low_rank_factors(w, 0.5, H=H, damp=1e-6)
    H_a = B.double() @ H.double() @ B.double().T
    sigma = torch.linalg.svdvals(w.double() @ torch.linalg.cholesky(H.double()))[:B.shape[0]]
    assert torch.allclose(H_a, torch.diag(sigma), rtol=1e-3, atol=1e-3 * float(sigma[0]))


def test_whitening_with_dead_inputs_and_untouched_inputs():
    w, x = random_weight(), correlated_inputs()
    x[:, 3] = 0
    H = x.T @ x / x.shape[0]
    w_before, H_before = w.clone(), H.clone()
    A, B = low_rank_factors(w, 0.5, H=H)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    assert torch.equal(w, w_before) and torch.equal(H, H_before)


def test_bad_rank_and_indefinite_h():
    with pytest.raises(ValueError):
        truncated_factors(random_weight(), 25)
    with pytest.raises(AutocompressError, match="positive definite"):
        low_rank_factors(random_weight(), 0.5, H=-torch.eye(40))


def test_a_factorization_asked_twice_inside_sharing_factors_is_computed_once(monkeypatch):
    from autocompress.compress import lowrank

    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(40, 64, generator=g), torch.randn(200, 64, generator=g)
    H = x.T @ x / 200
    alone = lowrank.low_rank_factors(w, 0.5, H)
    calls = []
    real = lowrank._factors
    monkeypatch.setattr(lowrank, "_factors", lambda *a: calls.append(1) or real(*a))
    with lowrank.sharing_factors():
        first = lowrank.low_rank_factors(w, 0.5, H)
        second = lowrank.low_rank_factors(w.clone(), 0.5, H.clone())
        other = lowrank.low_rank_factors(w, 0.25, H)  # another rank: computed
    assert len(calls) == 2
    assert all(torch.equal(a, b) for a, b in zip(alone, first)) and first is second
    assert other[0].shape[1] < first[0].shape[1]
