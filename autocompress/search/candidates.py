"""The plans a search measures, and level 1's: the proxy optimum, the optimum without 2-bit
options, and the largest uniform plans that fit."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..accounting import Footprint
from ..hardware.latency import DecodeEstimate
from ..plan import LayerConfig
from .exact import InfeasibleBudget, InfeasibleLimit
from .optuna_level import plan_signature
from .problem import Problem
from .space import SearchSpace


@dataclass
class Candidate:
    label: str
    configs: dict[str, LayerConfig]
    footprint: Footprint
    predicted: float | None  # summed proxy cost (nats), None for plans not from the table
    measured: dict | None = None  # held-out kl / ppl (level 3, or the in-process check)
    decode: DecodeEstimate | None = None  # predicted on the device, when one is given
    source: str = "proxy"  # proxy | uniform | optuna
    kl_fast: float | None = None  # level 2's low-fidelity KL

    def summary(self) -> dict:
        return {"label": self.label, "source": self.source, "total_bytes": self.footprint.total,
                "weight_bytes": self.footprint.weights, "predicted": self.predicted,
                "kl_fast": self.kl_fast, "measured": self.measured,
                "decode": None if self.decode is None else self.decode.as_dict()}

    @property
    def signature(self) -> str:
        return plan_signature(self.configs)


def level1_candidates(problem: Problem, space: SearchSpace, footprint_of) -> list[Candidate]:
    """Level 1: the proxy optimum, the optimum without 2-bit options, the largest uniform
    plans that fit."""
    found: dict[tuple, Candidate] = {}

    def add(label: str, choice: list[int], source: str = "proxy") -> None:
        configs = problem.configs(choice)
        signature = tuple(configs[n] for n in problem.table.layers)
        if signature in found:  # same plan reached twice: measure once, keep both names
            found[signature].label += f" = {label}"
            return
        found[signature] = Candidate(label, configs, footprint_of(configs),
                                     problem.predicted(choice), source=source)

    add("proxy optimum", problem.solve())
    no_two_bit = problem.option_mask(lambda cfg: cfg.bits > 2)
    if (problem.allowed & ~no_two_bit).any() and (problem.allowed & no_two_bit).any(axis=1).all():
        try:
            add("proxy optimum, no 2-bit", problem.solve(allowed=no_two_bit))
        except (InfeasibleBudget, InfeasibleLimit):  # nothing without 2-bit fits the limits
            pass
    for cfg, choice in largest_uniform(problem, space):
        add(f"uniform {cfg.short()}", choice, source="uniform")
    return list(found.values())


def largest_uniform(problem: Problem, space: SearchSpace) -> list[tuple[LayerConfig, list[int]]]:
    """The largest uniform options that fit (pinned layers keep their pin) and meet the limits
    (more bytes, more fidelity): every one of that size, since options of equal bytes differ
    in method (RTN or GPTQ) and the proxy is least trusted in telling them apart."""
    fitting = []
    rows = np.arange(len(problem.groups))
    for cfg in space.uniform_configs():
        choice = [row.index(cfg) if cfg in row else 0 for row in problem.options]
        size = problem.layer_bytes(choice)
        within = all(limit.usage[rows, choice].sum() <= limit.maximum for limit in problem.limits)
        if size <= problem.capacity and within:
            fitting.append((size, cfg, choice))
    largest = max((size for size, _, _ in fitting), default=None)
    return [(cfg, choice) for size, cfg, choice in fitting if size == largest]


def most_common(configs: dict[str, LayerConfig]) -> LayerConfig:
    counts: dict[LayerConfig, int] = {}
    for cfg in configs.values():
        counts[cfg] = counts.get(cfg, 0) + 1
    return max(counts, key=counts.get)
