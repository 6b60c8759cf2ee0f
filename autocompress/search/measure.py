"""Measure plans for real: apply (fake-quant) and take KL to the uncompressed model, and
perplexity, on held-out windows. One meter serves many plans: the reference log-probabilities
are computed once. In ``parallel`` mode (level 2's low-fidelity trials) the calibration
statistics (for GPTQ, Wanda and whitened low rank) are also taken once, from the uncompressed
model, and expensive per-layer results are shared across plans. In ``sequential`` mode each plan
is calibrated block by block through its own compressed prefix, exactly as ``apply`` builds it
from the plan's provenance: that is how the chosen plan's figures are measured. Plans are
compressed into the model in place and it is restored after each (compress/apply.py's
``compressed_in_place``), quantized layers held as their codes (a quarter of their float32
bytes; the same outputs)."""

from __future__ import annotations

import torch

from contextlib import contextmanager
from typing import Iterator

from torch import nn

from ..compress.apply import compressed_in_place, needs_hessian, uses_calibration
from ..compress.memo import LayerMemo, memo_dir
from ..compress.stats_store import StatsStore
from ..compress.weights import GPTQSettings
from ..evaluate import ReferenceCache, evaluate
from ..model import LoadedModel
from ..plan import LayerConfig


class PlanMeter:
    def __init__(self, loaded: LoadedModel, holdout: torch.Tensor, calib: torch.Tensor | None,
                 progress: bool = False, mode: str = "parallel",
                 gptq: GPTQSettings = GPTQSettings(),
                 fixed: dict[str, LayerConfig] | None = None,
                 hessian_layers: set[str] | None = None, stats: StatsStore | None = None):
        """``fixed``: configs every measured plan shares (the search space's embedding);
        ``hessian_layers``: the layers whose configs may need the full E[x xᵀ] (GPTQ, low
        rank; None: all), the others' statistics keep only its diagonal. ``stats``: where the
        calibration statistics are (or go; default: a temporary directory), read a layer at a
        time."""
        if mode not in ("parallel", "sequential"):
            raise ValueError(f"unknown calibration mode {mode!r}")
        self.loaded, self.holdout, self.calib, self.progress = loaded, holdout, calib, progress
        self.mode, self.gptq = mode, gptq
        self.fixed = dict(fixed or {})
        self.reference = ReferenceCache(loaded.model, holdout)
        self.hessian_layers = hessian_layers if stats is None else stats.hessian_layers
        if stats is None and calib is not None:  # taken when a plan first needs them
            stats = StatsStore(None, loaded.layers, {}, self.hessian_layers,
                               loaded.placement.device)
        self._stats = stats
        # SVD / GPTQ / GGUF results per (layer, config), shared by all plans: on disk beside
        # the statistics they were computed from (where other workers find them too), and in
        # memory up to an eighth of a byte per weight of the block linears (a read from the
        # page cache costs milliseconds; a 1.5B model's codes are 1.3 GB)
        weights = sum(l.out_features * l.in_features for l in loaded.layers)
        self._memo = LayerMemo(max_bytes=weights if stats is None else weights // 8,
                               directory=None if stats is None else
                               memo_dir(stats.directory, gptq))

    def stats_for(self, configs: dict[str, LayerConfig]) -> StatsStore | None:
        if self.calib is None and self._stats is None or not uses_calibration(configs.values()):
            return None
        if self.hessian_layers is not None:
            beyond = [n for n, cfg in configs.items()
                      if needs_hessian(cfg) and n not in self.hessian_layers]
            if beyond:
                raise ValueError(f"{beyond[0]} needs E[x xᵀ], which this meter does not keep")
        if not self._stats.complete:
            if self.calib is None:
                raise ValueError("the statistics store is incomplete and this meter has no "
                                 "calibration windows to complete it")
            self._stats.fill(self.loaded.model, self.calib, progress=self.progress)
        return self._stats

    @contextmanager
    def compressed(self, configs: dict[str, LayerConfig]) -> Iterator[nn.Module]:
        """The model under ``configs``, as every plan here is measured, for the duration of the
        block: compressed in place and restored after (one candidate's new weights in memory,
        not a copy of the model)."""
        configs = {**configs, **self.fixed}
        self.reference.fill()  # the reference is the model before any plan is put into it
        if self.mode == "sequential":
            calib = self.calib if uses_calibration(configs.values()) else None
            context = compressed_in_place(self.loaded, configs, calib, mode="sequential",
                                          progress=False, gptq=self.gptq, codes=True)
        else:
            stats = self.stats_for(configs)
            context = compressed_in_place(self.loaded, configs, stats=stats, mode="parallel",
                                          progress=False, gptq=self.gptq,
                                          memo=self._memo if stats is not None else None,
                                          codes=True)
        with context as model:
            yield model

    def measure(self, configs: dict[str, LayerConfig], desc: str = "measure") -> dict:
        with self.compressed(configs) as model:
            result = evaluate(model, self.holdout, self.reference, progress=self.progress,
                              desc=desc)
        return {"kl": result.kl, "ppl": result.ppl, "tokens": result.tokens,
                "windows": result.windows}

