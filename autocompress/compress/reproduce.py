"""Build a plan's model the way its provenance says, so that ``apply``, ``eval`` and ``export``
reproduce the weights the search measured (same calibration windows, mode and GPTQ settings).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..model import LoadedModel
from ..plan import Plan
from ..provenance import (
    LEGACY,
    BuildOverrides,
    Provenance,
    calibration_windows,
    dtype_note,
    resolve,
)
from ..errors import AutocompressError
from .apply import compress_model, compressed_in_place, uses_calibration
from .recover import apply_recovered


@dataclass
class BuildRecipe:
    """What a build will use: the provenance in force, its calibration windows (None when the
    plan needs none) and the lines that say so."""

    provenance: Provenance
    calib: torch.Tensor | None
    notes: list[str]

    @property
    def mode(self) -> str:
        return self.provenance.mode

    @property
    def gptq(self):
        return self.provenance.gptq_settings()


def build_recipe(loaded: LoadedModel, plan: Plan,
                 overrides: BuildOverrides | None = None) -> BuildRecipe:
    provenance, notes = resolve(plan.provenance, overrides)
    configs = plan.resolve(layer.name for layer in loaded.layers)
    if not uses_calibration(configs.values()):
        # RTN and magnitude pruning: the calibration record does not change the weights, the
        # precision they are computed in does
        recorded = plan.provenance or LEGACY
        return BuildRecipe(provenance, None, [] if provenance.compute_dtype ==
                           recorded.compute_dtype else [dtype_note(recorded,
                                                                   provenance.compute_dtype)])
    return BuildRecipe(provenance, calibration_windows(loaded.tokenizer, provenance), notes)


def build_model(loaded: LoadedModel, plan: Plan, recipe: BuildRecipe | None = None,
                progress: bool = True) -> nn.Module:
    """The plan's compressed (fake-quant) model, built as its provenance records."""
    if plan.recovery is not None:
        raise AutocompressError("a plan with recovered tensors is built in place "
                                "(built_in_place), where its scales are put into its codes")
    recipe = recipe or build_recipe(loaded, plan)
    return compress_model(loaded, plan, recipe.calib, mode=recipe.mode, gptq=recipe.gptq,
                          progress=progress, copy_source=recipe.provenance.gguf_source_copy)


@contextmanager
def built_in_place(loaded: LoadedModel, plan: Plan, recipe: BuildRecipe | None = None,
                   progress: bool = True, codes: bool = False) -> Iterator[nn.Module]:
    """``build_model``'s weights, made in ``loaded.model`` itself for the duration of the block
    and undone after: no second copy of the model (6 GB in float32 for a 1.5B model). What
    needs the uncompressed model (a ReferenceCache) is computed before. ``codes``: quantized
    layers held as their codes, for callers that only run the model (apply.py). A plan with
    recovered tensors is always built as codes, and its tensors put in after the whole build
    (they were trained on that build: sequential calibration saw the codes' original scales)."""
    recipe = recipe or build_recipe(loaded, plan)
    recovered = plan.recovered_tensors()  # a missing or altered file fails before the build
    with compressed_in_place(loaded, plan, recipe.calib, mode=recipe.mode, gptq=recipe.gptq,
                             progress=progress, codes=codes or recovered is not None,
                             copy_source=recipe.provenance.gguf_source_copy) as model:
        if recovered is not None:
            apply_recovered(model, recovered)
        yield model
