"""Build a sensitivity table from a proxy.

Issue-2 proxy: ``fisher`` — ½ Σ F ⊙ ΔW², with F the empirical Fisher diagonal over
calibration windows and ΔW the real error of the option (the compressed weight minus the
original, from the same operators the plan is applied with).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..accounting import layer_bytes
from ..compress.weights import compress_weight
from ..errors import AutocompressError
from ..model import LoadedModel
from .fisher import fisher_diagonal
from .table import SensitivityTable


def fisher_table(loaded: LoadedModel, space, windows: torch.Tensor,
                 progress: bool = True) -> SensitivityTable:
    layers = loaded.layers
    options = [space.for_layer(layer) for layer in layers]
    if any(o.method == "gptq" or (o.is_pruned and o.prune_method == "wanda")
           for opts in options for o in opts):
        raise AutocompressError("the fisher proxy here scores RTN and magnitude options only")
    fisher = fisher_diagonal(loaded.model, layers, windows, progress=progress)
    costs, sizes = [], []
    for layer, opts in tqdm(list(zip(layers, options)), desc="sensitivity", disable=not progress,
                            leave=False):
        weight = loaded.module(layer.name).weight.detach().float()
        f = fisher[layer.name]
        row = []
        for cfg in opts:
            delta = compress_weight(weight, cfg).weight() - weight
            row.append(0.5 * float((f * delta.square()).sum()))
        costs.append(row)
        sizes.append([layer_bytes(layer.out_features, layer.in_features, cfg) for cfg in opts])
    return SensitivityTable(
        layers=[layer.name for layer in layers], options=options, cost=costs, bytes=sizes,
        proxy="fisher", meta={"windows": int(windows.shape[0]), "window_len": int(windows.shape[1])},
    )
