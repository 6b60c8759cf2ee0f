"""Exact multiple-choice knapsack: one option per layer, total bytes within a capacity,
minimum summed cost, solved as a 0/1 integer program with scipy's HiGHS-backed ``milp``.

    minimise   Σ_l Σ_o cost[l,o] · x[l,o]
    subject to Σ_o x[l,o] = 1                  for every layer l
               Σ_l Σ_o bytes[l,o] · x[l,o] ≤ C
               x ∈ {0, 1}
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_matrix

from ..errors import AutocompressError
from ..units import format_size


class InfeasibleBudget(AutocompressError):
    """No choice of options fits the capacity."""

    def __init__(self, capacity: int, minimum: int, what: str = "layer weights"):
        self.capacity = capacity
        self.minimum = minimum
        super().__init__(
            f"no plan fits: the smallest possible {what} take {format_size(minimum)} "
            f"({minimum} bytes) but the budget leaves {format_size(max(capacity, 0))} for them; "
            "raise the budget or allow fewer bits/more sparsity in the search space"
        )


def solve_mckp(cost: np.ndarray, size: np.ndarray, capacity: int,
               allowed: np.ndarray | None = None, time_limit: float = 60.0) -> list[int]:
    """Optimal option index per layer. ``cost``/``size``: [layers, options]; ``allowed``: bool mask
    of usable options (padding, or options excluded by a caller)."""
    n_layers, n_opts = cost.shape
    allowed = np.isfinite(cost) if allowed is None else (allowed & np.isfinite(cost))
    if not allowed.any(axis=1).all():
        raise AutocompressError("a layer has no allowed option in the search space")
    minimum = int(np.where(allowed, size, np.iinfo(np.int64).max).min(axis=1).sum())
    if minimum > capacity:
        raise InfeasibleBudget(capacity, minimum)

    target = capacity
    for _ in range(5):  # HiGHS tolerances can overshoot by a few bytes: tighten and re-solve
        choice = _solve(cost, size, target, allowed, time_limit)
        used = int(size[np.arange(n_layers), choice].sum())
        if used <= capacity:
            return choice.tolist()
        target -= used - capacity
    raise AutocompressError("the exact solver could not meet the byte budget exactly")


def _solve(cost: np.ndarray, size: np.ndarray, capacity: float, allowed: np.ndarray,
           time_limit: float) -> np.ndarray:
    n_layers, n_opts = cost.shape
    idx = np.flatnonzero(allowed.ravel())  # only allowed (layer, option) pairs become variables
    layer_of = idx // n_opts
    c = cost.ravel()[idx].astype(np.float64)
    c = c - c.min() if c.size else c  # a constant shift keeps HiGHS' tolerances meaningful
    one_per_layer = csr_matrix((np.ones(idx.size), (layer_of, np.arange(idx.size))),
                               shape=(n_layers, idx.size))
    bytes_row = size.ravel()[idx].astype(np.float64)[None, :]
    result = milp(
        c,
        constraints=[LinearConstraint(one_per_layer, 1, 1),
                     LinearConstraint(bytes_row, -np.inf, capacity)],
        integrality=np.ones(idx.size),
        bounds=Bounds(0, 1),
        options={"time_limit": time_limit, "mip_rel_gap": 1e-9},
    )
    if result.x is None:
        raise AutocompressError(f"the exact solver failed: {result.message}")
    chosen = idx[result.x > 0.5]
    choice = np.full(n_layers, -1)
    choice[chosen // n_opts] = chosen % n_opts
    if (choice < 0).any():
        raise AutocompressError("the exact solver returned an incomplete assignment")
    return choice
