"""The knapsack every search level solves: one option per decision group (tied layers share
one), the proxy's cost and the exact bytes summed over the group, a byte capacity for the
searched layers and further limits (predicted latency). Level 1 solves it as it is and sweeps
its capacity (the proxy Pareto front); level 2 solves it with reweighted costs."""

from __future__ import annotations

import numpy as np

from ..plan import LayerConfig
from ..sensitivity.table import SensitivityTable
from .exact import InfeasibleBudget, InfeasibleLimit, Limit, solve_mckp


def group_sums(per_layer: np.ndarray, groups: list[list[int]]) -> np.ndarray:
    """[layers, options] -> [decision groups, options]: tied layers take one option together,
    so their costs, bytes or latencies add up."""
    return np.stack([per_layer[g].sum(axis=0) for g in groups])


class Problem:
    def __init__(self, table: SensitivityTable, groups: list[list[int]], capacity: int,
                 limits: tuple[Limit, ...] = (), size: np.ndarray | None = None):
        """``size``: bytes per layer and option when not the table's (a device's engine may
        hold a format in more bytes than the plan's accounting)."""
        cost = table.cost_matrix()
        size = table.bytes_matrix() if size is None else size
        self.table, self.groups, self.capacity, self.limits = table, groups, capacity, limits
        self.cost, self.size = group_sums(cost, groups), group_sums(size, groups)
        width = self.cost.shape[1]
        # options per decision group (padding beyond a group's list: None, never allowed)
        self.options: list[list[LayerConfig | None]] = [
            list(table.options[g[0]]) + [None] * (width - len(table.options[g[0]]))
            for g in groups]
        self.allowed = np.isfinite(self.cost)
        self.min_bytes = int(np.where(self.allowed, self.size, np.iinfo(np.int64).max)
                             .min(axis=1).sum())

    # -- solving ------------------------------------------------------------------------------
    def solve(self, cost: np.ndarray | None = None, capacity: int | None = None,
              allowed: np.ndarray | None = None) -> list[int]:
        """Option index per decision group minimising ``cost`` (default: the proxy's)."""
        mask = self.allowed if allowed is None else (self.allowed & allowed)
        return solve_mckp(self.cost if cost is None else cost, self.size,
                          self.capacity if capacity is None else capacity, allowed=mask,
                          limits=self.limits)

    def front(self, points: int = 6) -> list[tuple[float, list[int]]]:
        """The proxy Pareto front: exact optima at capacities from the smallest feasible to the
        full one, as (fraction of the capacity, choice)."""
        out, seen = [], set()
        for fraction in np.linspace(1.0, self.min_bytes / self.capacity, points):
            try:
                choice = self.solve(capacity=int(fraction * self.capacity))
            except (InfeasibleBudget, InfeasibleLimit):  # rounding at the small end
                continue
            if tuple(choice) not in seen:
                seen.add(tuple(choice))
                out.append((float(fraction), choice))
        return out

    # -- reading a choice ---------------------------------------------------------------------
    def per_layer(self, choice: list[int]) -> list[int]:
        per_layer = [0] * len(self.table.layers)
        for group, option in zip(self.groups, choice):
            for index in group:
                per_layer[index] = option
        return per_layer

    def configs(self, choice: list[int]) -> dict[str, LayerConfig]:
        return self.table.configs(self.per_layer(choice))

    def predicted(self, choice: list[int]) -> float:
        return float(self.cost[np.arange(len(choice)), choice].sum())

    def layer_bytes(self, choice: list[int]) -> int:
        return int(self.size[np.arange(len(choice)), choice].sum())

    def option_mask(self, keep) -> np.ndarray:
        """Boolean [groups, options]: ``keep(cfg)`` for each real option."""
        return np.array([[cfg is not None and bool(keep(cfg)) for cfg in row]
                         for row in self.options])
