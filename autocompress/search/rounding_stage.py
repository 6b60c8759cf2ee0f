"""The search's optional stage ``search --rounding signround``: the chosen plan's quantized
dense layers (RTN or GPTQ, native formats, AWQ-scaled or not) get learned rounding
(compress/signround.py) in the same formats, so the same bytes; the plan is built as apply
will build it, measured again on the held-out windows the search measured it on, and kept
only where its KL is lower. Either way the plan's figures say what was tried
(``figures["rounding"]``), and a kept plan's held-out figures are the rounded model's (``eval
--holdout`` reproduces them), with the searched plan's kept beside them
(``before_rounding``)."""

from __future__ import annotations

import dataclasses

from ..compress.reproduce import build_recipe, built_in_place
from ..errors import AutocompressError
from ..evaluate import ReferenceCache, evaluate
from ..model import LoadedModel
from ..plan import LayerConfig, Plan, compact_overrides
from .candidates import most_common
from .holdout import reported

ROUNDINGS = ("signround",)


def learns_rounding_in_place_of(cfg: LayerConfig) -> bool:
    """Layers whose rounding can be learned without changing their format: native integer
    grids (RTN or GPTQ, any clip, with or without AWQ's input scale, which they keep) of
    dense, full-rank weights."""
    return (not cfg.is_gguf and cfg.bits < 16 and not cfg.is_pruned and not cfg.is_low_rank
            and cfg.method in ("rtn", "gptq"))


def with_learned_rounding(plan: Plan, loaded: LoadedModel) -> tuple[Plan, int]:
    """``plan`` with every eligible block linear at ``method: signround`` (same format), and
    how many layers that changed. The embedding and head overrides are kept as they are."""
    blocks = plan.resolve(layer.name for layer in loaded.layers)
    rounded = {name: dataclasses.replace(cfg, method="signround", clip=False)
               if learns_rounding_in_place_of(cfg) else cfg for name, cfg in blocks.items()}
    changed = sum(rounded[name] != blocks[name] for name in blocks)
    default = most_common(rounded)
    table_names = {table.name for table in loaded.tables}
    tables = {name: partial for name, partial in plan.overrides.items() if name in table_names}
    out = dataclasses.replace(plan, default=default,
                              overrides={**compact_overrides(rounded, default), **tables},
                              figures=dict(plan.figures))
    return out, changed


def round_chosen(loaded: LoadedModel, plan: Plan, holdout, method: str = "signround",
                 progress: bool = True, log=print) -> Plan:
    """The chosen plan with learned rounding where that lowers its held-out KL, else itself."""
    if method not in ROUNDINGS:
        raise AutocompressError(f"unknown rounding {method!r}: use one of {', '.join(ROUNDINGS)}")
    rounded, changed = with_learned_rounding(plan, loaded)
    before = plan.figures["holdout"]["reported"]
    if not changed:
        log("learned rounding: the chosen plan has no RTN or GPTQ layer to round")
        plan.figures["rounding"] = {"method": method, "layers": 0, "kept": False}
        return plan
    log(f"learned rounding ({method}) of the chosen plan's {changed} RTN/GPTQ layers, block by "
        "block")
    reference = ReferenceCache(loaded.model, holdout).fill()
    with built_in_place(loaded, rounded, build_recipe(loaded, rounded), progress=progress,
                        codes=True) as model:
        result = evaluate(model, holdout, reference, progress=False)
    measured = reported(result.as_dict())
    kept = result.kl < before["kl"]
    record = {"method": method, "layers": changed, "kept": kept, "measured": measured}
    log(f"learned rounding: held-out KL {before['kl']:.4f} -> {result.kl:.4f}"
        + ("" if kept else "; not lower, so the plan stays as searched"))
    if not kept:
        plan.figures["rounding"] = record
        return plan
    rounded.figures["holdout"] = {**plan.figures["holdout"], "reported": measured,
                                  "before_rounding": before}
    rounded.figures["rounding"] = record
    return rounded
