"""The search's last, optional stage (``search --recover kd``): the chosen plan recovered by
distillation (compress/recover.py) as ``apply --recover kd`` recovers it, then measured again
on the same held-out windows, so that the plan's figures are those of the model the user gets
(``eval --holdout`` reproduces them). The recovered tensors go beside plan.json; an interrupted
recovery resumes from its checkpoint in the search's directory."""

from __future__ import annotations

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
    record = recovered.figures["holdout"]
    record["reported"] = reported(result.as_dict())
    record["before_recovery"] = before
    if out:
        atomic_write_bytes(out / recovered.recovery.tensors, data)
        recovered.directory = out
        (out / CHECKPOINT).unlink(missing_ok=True)
    log(f"{recovered.recovery.describe()}; held-out KL of the plan {before['kl']:.4f} -> "
        f"{result.kl:.4f}")
    return recovered
