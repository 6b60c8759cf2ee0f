import itertools

import numpy as np
import pytest

from autocompress.search.exact import InfeasibleBudget, solve_mckp


def brute_force(cost, size, capacity):
    best, best_choice = np.inf, None
    for choice in itertools.product(range(cost.shape[1]), repeat=cost.shape[0]):
        c = sum(cost[l, o] for l, o in enumerate(choice))
        s = sum(size[l, o] for l, o in enumerate(choice))
        if s <= capacity and c < best:
            best, best_choice = c, choice
    return best, best_choice


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    size = np.sort(rng.integers(100, 10_000, size=(6, 4)), axis=1)
    cost = np.sort(rng.random((6, 4)), axis=1)[:, ::-1].copy()  # more bytes, less cost
    capacity = int(size.min(axis=1).sum() + 0.4 * (size.max(axis=1) - size.min(axis=1)).sum())
    choice = solve_mckp(cost, size, capacity)
    best, _ = brute_force(cost, size, capacity)
    assert sum(size[l, o] for l, o in enumerate(choice)) <= capacity
    assert sum(cost[l, o] for l, o in enumerate(choice)) == pytest.approx(best)


def test_allowed_mask_is_respected():
    cost = np.array([[0.0, 1.0], [0.0, 1.0]])
    size = np.array([[10, 1], [10, 1]])
    choice = solve_mckp(cost, size, 100, allowed=np.array([[False, True], [True, True]]))
    assert choice == [1, 0]


def test_infeasible_reports_the_minimum():
    size = np.array([[10, 20], [30, 40]])
    with pytest.raises(InfeasibleBudget) as err:
        solve_mckp(np.zeros((2, 2)), size, 39)
    assert err.value.minimum == 40 and "40 bytes" in str(err.value)


def test_limits_that_only_conflict_together_are_reported_as_such():
    from autocompress.search.exact import InfeasibleLimit, Limit

    # option 0: small and slow, option 1: big and fast; each limit alone is satisfiable
    size = np.array([[10, 100], [10, 100]])
    usage = np.array([[10.0, 1.0], [10.0, 1.0]])
    limit = Limit(usage, 5.0, lambda least: "too slow")
    with pytest.raises(InfeasibleLimit, match="together"):
        solve_mckp(np.zeros((2, 2)), size, 50, limits=(limit,))
    assert solve_mckp(np.zeros((2, 2)), size, 200, limits=(limit,)) == [1, 1]
