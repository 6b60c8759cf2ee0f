import pytest
import torch

from autocompress.compress.prune import magnitude_mask, prune, wanda_mask
from autocompress.errors import AutocompressError


def random_weight(out_features=8, in_features=64, seed=0):
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))


def reference_row_mask(scores, sparsity):
    keep = torch.ones_like(scores, dtype=torch.bool)
    n_removed = round(sparsity * scores.shape[1])
    for r in range(scores.shape[0]):
        for c in sorted(range(scores.shape[1]), key=lambda c: float(scores[r, c]))[:n_removed]:
            keep[r, c] = False
    return keep


def reference_two_four_mask(scores):
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for r in range(scores.shape[0]):
        for start in range(0, scores.shape[1], 4):
            quad = [float(s) for s in scores[r, start:start + 4]]
            for c in sorted(range(4), key=lambda c: -quad[c])[:2]:
                keep[r, start + c] = True
    return keep


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("in_features", [50, 64])
def test_magnitude_unstructured_matches_reference(sparsity, in_features):
    w = random_weight(in_features=in_features)
    mask = magnitude_mask(w, sparsity)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, reference_row_mask(w.abs(), sparsity))
    assert (mask.sum(1) == in_features - round(sparsity * in_features)).all()  # every row alike


def test_magnitude_two_four_matches_reference():
    w = random_weight(in_features=64)
    mask = magnitude_mask(w, 0.5, "2:4")
    assert torch.equal(mask, reference_two_four_mask(w.abs()))
    assert (mask.reshape(8, 16, 4).sum(2) == 2).all()


def test_two_four_ignores_the_sparsity_argument():
    w = random_weight()
    assert torch.equal(magnitude_mask(w, 0.0, "2:4"), magnitude_mask(w, 0.5, "2:4"))


def test_two_four_needs_columns_divisible_by_four():
    with pytest.raises(AutocompressError, match="divisible by 4"):
        magnitude_mask(random_weight(in_features=50), 0.5, "2:4")


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_wanda_matches_reference(pattern):
    w = random_weight()
    act_norm = torch.rand(64, generator=torch.Generator().manual_seed(3)) * 10
    scores = w.abs() * act_norm
    if pattern == "unstructured":
        expected = reference_row_mask(scores, 0.5)
    else:
        expected = reference_two_four_mask(scores)
    assert torch.equal(wanda_mask(w, act_norm, 0.5, pattern), expected)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_wanda_keeps_the_column_with_huge_activations(pattern):
    w = random_weight()
    w[:, 13] *= 1e-3  # small weights that magnitude pruning would drop
    act_norm = torch.ones(64)
    act_norm[13] = 1e6
    assert not magnitude_mask(w, 0.5, pattern)[:, 13].all()
    assert wanda_mask(w, act_norm, 0.5, pattern)[:, 13].all()


def test_wanda_with_uniform_activations_is_magnitude():
    w = random_weight()
    assert torch.equal(wanda_mask(w, torch.full((64,), 3.0), 0.4), magnitude_mask(w, 0.4))


def test_wanda_checks_act_norm_shape():
    with pytest.raises(ValueError, match="act_norm"):
        wanda_mask(random_weight(), torch.ones(63), 0.5)


def test_prune_zeroes_outside_mask_and_leaves_inputs():
    w = random_weight().half()
    before = w.clone()
    mask = magnitude_mask(w, 0.6)
    pruned = prune(w, mask)
    assert pruned.dtype == torch.float32
    assert (pruned[~mask] == 0).all()
    assert torch.equal(pruned[mask], w.float()[mask])
    assert torch.equal(w, before)
    assert float((pruned == 0).float().mean()) == pytest.approx(round(0.6 * 64) / 64)
