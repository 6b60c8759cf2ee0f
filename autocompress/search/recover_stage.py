"""The search's last, optional stage (``search --recover kd``): the chosen plan recovered by
distillation (compress/recover.py) as ``apply --recover kd`` recovers it, then measured again
on the same held-out windows, so that the plan's figures are those of the model the user gets
(``eval --holdout`` reproduces them). Kept only where it lowers the plan's held-out KL (as
learned rounding is); either way ``figures["recovery"]`` says what was tried. The recovered
tensors go beside plan.json; an interrupted recovery resumes from its checkpoint in the
search's directory."""

from __future__ import annotations

import copy
from pathlib import Path

from ..compress.recover import KDSettings, recovered_in_place
from ..compress.reproduce import build_recipe
from ..evaluate import ReferenceCache, evaluate
from ..io_utils import atomic_write_bytes
from ..model import LoadedModel
from ..plan import Plan
from .holdout import reported

CHECKPOINT = "recover.checkpoint.pt"


def recover_chosen(loaded: LoadedModel, plan: Plan, holdout, settings: KDSettings,
                   out: Path | None, progress: bool = True, log=print) -> Plan:
    """``plan`` recovered, its held-out figures measured again on ``holdout`` (the windows
    the search measured it on); the tensors written to ``out`` beside the plan."""
    recipe = build_recipe(loaded, plan)
    reference = ReferenceCache(loaded.model, holdout).fill()
    before = plan.figures["holdout"]["reported"]
    log(f"recovering the chosen plan by distillation ({settings.steps} steps at most)")
    with recovered_in_place(loaded, plan, recipe, settings,
                            checkpoint=out / CHECKPOINT if out else None,
                            progress=progress) as (model, recovered, data):
        result = evaluate(model, holdout, reference, progress=False)
    measured = reported(result.as_dict())
    # best step 0: the trained tensors are the plan's own, a recovery in name only
    kept = recovered.recovery.best_step > 0 and result.kl < before["kl"]
    tried = {"method": recovered.recovery.method, "kept": kept,
             "steps": recovered.recovery.steps, "best_step": recovered.recovery.best_step,
             "lr": recovered.recovery.lr, "lr_abandoned": recovered.recovery.lr_abandoned,
             "lr_lowered_at": recovered.recovery.lr_lowered_at, "measured": measured}
    log(f"{recovered.recovery.describe()}; held-out KL of the plan {before['kl']:.4f} -> "
        f"{result.kl:.4f}" + ("" if kept else "; not lower, so the plan stays as it was"))
    if not kept:
        if out:
            (out / CHECKPOINT).unlink(missing_ok=True)
        plan.figures["recovery"] = tried
        return plan
    recovered.figures = copy.deepcopy(plan.figures)  # replace() shared the plan's dict
    recovered.figures["holdout"]["reported"] = measured
    recovered.figures["holdout"]["before_recovery"] = before
    recovered.figures["recovery"] = tried
    if out:
        atomic_write_bytes(out / recovered.recovery.tensors, data)
        recovered.directory = out
        (out / CHECKPOINT).unlink(missing_ok=True)
    return recovered
