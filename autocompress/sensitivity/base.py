"""The extension point for sensitivity proxies (one subclass per proxy, as Optuna's samplers).

A proxy predicts, for one layer, how much the LM loss rises when the layer's weight W is
replaced by its compressed version W + ΔW, for several options at once. The builder
(sensitivity/build.py) computes the real ΔW of every option with the same operators that apply
plans, and hands them to ``layer_costs``; the proxy turns them into additive costs (nats).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from typing import Callable, Mapping

from ..model import LayerInfo, LoadedModel

#: a block's layers and their calibration statistics (layer name -> compress.InputStats)
OnBlockReady = Callable[[list[LayerInfo], Mapping], None]


class SensitivityProxy(ABC):
    """Subclasses set ``name`` and implement ``prepare`` and ``layer_costs``."""

    name: str = "abstract"
    #: True when ``prepare`` needs gradients (backward passes through the model)
    uses_gradients: bool = False

    @abstractmethod
    def prepare(self, loaded: LoadedModel, windows: torch.Tensor, layers: list[LayerInfo],
                progress: bool = True) -> None:
        """Gather whatever statistics the proxy needs from calibration ``windows`` [n, L]."""

    @abstractmethod
    def layer_costs(self, layer: LayerInfo, weight: torch.Tensor,
                    deltas: list[torch.Tensor]) -> list[float]:
        """Predicted loss increase of each ΔW in ``deltas`` (same shape as ``weight``)."""

    #: True when the proxy implements ``prepare_blocks``
    blockwise: bool = False

    def prepare_blocks(self, loaded: LoadedModel, windows: torch.Tensor,
                       layers: list[LayerInfo], on_block: OnBlockReady,
                       hessian_layers: set[str], progress: bool = True) -> None:
        """``prepare`` one block at a time: for each block holding some of ``layers``,
        gather its statistics, call ``on_block(its layers, their input statistics)`` (full
        E[x xᵀ] for ``hessian_layers``) while ``layer_costs`` can score them, then drop them.
        A model bigger than memory is scored this way (sequential onloading)."""
        raise NotImplementedError(f"the {self.name} proxy has no block-by-block preparation")

    def rtn_costs(self, layer: LayerInfo, weight: torch.Tensor,
                  options: list[tuple[int, int, bool]]) -> list[float] | None:
        """Costs of plain RTN options (bits, group_size, sym) of one layer scored without
        materialising their ΔW (compress/quant.py's ``quant_error_many``: one min/max pass per
        group size), or None when the proxy has no such fast path: ``layer_costs`` then
        scores them from their ΔW. Must equal ``layer_costs`` on the same options."""
        return None

    def prepared_state(self) -> dict | None:
        """What ``prepare`` gathered, as JSON, where it is small enough to keep beside the
        table's rows (None: not kept). A build resumed after an interruption then scores its
        remaining layers with the same preparation, so its table is the uninterrupted one's
        (a Hutchinson estimate depends on which layers share its probes)."""
        return None

    def restore_prepared(self, state: dict | None, layers: list[LayerInfo]) -> bool:
        """Take back a ``prepared_state``; False (prepare again) where it does not cover
        ``layers`` or the proxy keeps none."""
        return False

    def describe(self) -> dict:
        """Settings that change the table's numbers (part of its cache key)."""
        return {"proxy": self.name}


PROXIES: dict[str, type[SensitivityProxy]] = {}


def register(cls: type[SensitivityProxy]) -> type[SensitivityProxy]:
    PROXIES[cls.name] = cls
    return cls
