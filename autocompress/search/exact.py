"""Exact multiple-choice knapsack: one option per layer, total bytes within a capacity,
minimum summed cost, solved as a 0/1 integer program with scipy's HiGHS-backed ``milp``.

    minimise   Σ_l Σ_o cost[l,o] · x[l,o]
    subject to Σ_o x[l,o] = 1                  for every layer l
               Σ_l Σ_o bytes[l,o] · x[l,o] ≤ C
               Σ_l Σ_o r_k[l,o] · x[l,o] ≤ R_k   for every further resource k (e.g. latency)
               x ∈ {0, 1}
"""

from __future__ import annotations

import contextlib
import os
import sys

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_matrix

from ..errors import AutocompressError
from ..units import format_size


class Limit:
    """A further resource per (layer, option), e.g. predicted decode seconds, and its maximum.
    ``describe(minimum)`` words the error when even the smallest choice exceeds it."""

    def __init__(self, usage: np.ndarray, maximum: float, describe):
        self.usage, self.maximum, self.describe = usage, maximum, describe


class InfeasibleLimit(AutocompressError):
    """No choice of options meets a further limit (latency)."""


class InfeasibleBudget(AutocompressError):
    """No choice of options fits the capacity."""

    def __init__(self, capacity: int, minimum: int, what: str = "layer weights",
                 detail: str = "", fix: str = ""):
        self.capacity = capacity
        self.minimum = minimum
        super().__init__(
            f"no plan fits: the smallest possible {what} take {format_size(minimum)} "
            f"({minimum} bytes{'; ' + detail if detail else ''}) but the budget leaves "
            f"{format_size(max(capacity, 0))} for them; "
            + (fix or "raise the budget or allow fewer bits/more sparsity in the search space")
        )


def solve_mckp(cost: np.ndarray, size: np.ndarray, capacity: int,
               allowed: np.ndarray | None = None, time_limit: float = 60.0,
               limits: tuple[Limit, ...] = ()) -> list[int]:
    """Optimal option index per layer. ``cost``/``size``: [layers, options]; ``allowed``: bool mask
    of usable options (padding, or options excluded by a caller); ``limits``: further resources,
    each summed over the chosen options and kept at most its maximum."""
    n_layers, n_opts = cost.shape
    allowed = np.isfinite(cost) if allowed is None else (allowed & np.isfinite(cost))
    if not allowed.any(axis=1).all():
        raise AutocompressError("a layer has no allowed option in the search space")
    minimum = int(np.where(allowed, size, np.iinfo(np.int64).max).min(axis=1).sum())
    if minimum > capacity:
        raise InfeasibleBudget(capacity, minimum)
    for limit in limits:
        least = float(np.where(allowed, limit.usage, np.inf).min(axis=1).sum())
        if least > limit.maximum:
            raise InfeasibleLimit(limit.describe(least))

    target = capacity
    targets = [limit.maximum for limit in limits]
    rows = np.arange(n_layers)
    for _ in range(5):  # HiGHS tolerances can overshoot a little: tighten and re-solve
        choice = _solve(cost, size, target, allowed, time_limit,
                        [(limit.usage, t) for limit, t in zip(limits, targets)])
        used = int(size[rows, choice].sum())
        over = [float(limit.usage[rows, choice].sum()) - limit.maximum for limit in limits]
        if used <= capacity and all(o <= 1e-9 * max(1.0, abs(limit.maximum))
                                    for o, limit in zip(over, limits)):
            return choice.tolist()
        target -= max(used - capacity, 0)
        targets = [t - max(o, 0) * 1.01 for t, o in zip(targets, over)]
    raise AutocompressError("the exact solver could not meet the byte budget exactly")


def _solve(cost: np.ndarray, size: np.ndarray, capacity: float, allowed: np.ndarray,
           time_limit: float, extra: list[tuple[np.ndarray, float]] = ()) -> np.ndarray:
    n_layers, n_opts = cost.shape
    idx = np.flatnonzero(allowed.ravel())  # only allowed (layer, option) pairs become variables
    layer_of = idx // n_opts
    c = cost.ravel()[idx].astype(np.float64)
    c = c - c.min() if c.size else c  # a constant shift keeps HiGHS' tolerances meaningful
    one_per_layer = csr_matrix((np.ones(idx.size), (layer_of, np.arange(idx.size))),
                               shape=(n_layers, idx.size))
    bytes_row = size.ravel()[idx].astype(np.float64)[None, :]
    constraints = [LinearConstraint(one_per_layer, 1, 1),
                   LinearConstraint(bytes_row, -np.inf, capacity)]
    for usage, maximum in extra:
        constraints.append(LinearConstraint(usage.ravel()[idx].astype(np.float64)[None, :],
                                            -np.inf, maximum))
    with _quiet_c_stdout():
        result = milp(
            c,
            constraints=constraints,
            integrality=np.ones(idx.size),
            bounds=Bounds(0, 1),
            options={"time_limit": time_limit, "mip_rel_gap": 1e-9},
        )
    if result.x is None:
        if result.status == 2 or "infeasible" in str(result.message).lower():
            # each limit alone can be met (checked before), but not all of them at once
            raise InfeasibleLimit("no plan meets the byte budget and the latency limit together; "
                                  "relax one of them or allow more options in the search space")
        raise AutocompressError(f"the exact solver failed: {result.message}")
    chosen = idx[result.x > 0.5]
    choice = np.full(n_layers, -1)
    choice[chosen // n_opts] = chosen % n_opts
    if (choice < 0).any():
        raise AutocompressError("the exact solver returned an incomplete assignment")
    return choice


@contextlib.contextmanager
def _quiet_c_stdout():
    """HiGHS sometimes prints solver internals from C straight to file descriptor 1 (ignoring
    ``disp``); keep them off the user's stdout, which may carry --json output."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # captured stdout (pytest, notebooks)
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
