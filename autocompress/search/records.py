"""What a search writes about its result: the chosen candidate as a plan (formats, provenance,
the figures it measured) and the quality-against-memory front of everything it measured."""

from __future__ import annotations

from pathlib import Path

from ..plan import LayerConfig, Plan, compact_overrides
from ..provenance import Provenance
from .candidates import Candidate, most_common
from .holdout import holdout_record


def plan_of(setup, chosen: Candidate, candidates: list[Candidate], calib,
             timings: dict[str, float]) -> Plan:
    """The chosen candidate as a plan: its formats, how its weights are made (provenance:
    what apply and eval reproduce) and the figures the search measured for it."""
    loaded, settings = setup.loaded, setup.settings
    default = most_common(chosen.configs)
    calib_text = str(Path(settings.calib_text).resolve()) if settings.calib_text else None
    provenance = Provenance(calib_text=calib_text, calib_windows=settings.n_calib,
                            window_len=settings.window_len, calib_digest=calib.digest,
                            mode=settings.mode, gptq_damp=settings.gptq.damp,
                            gptq_act_order=settings.gptq.act_order,
                            gptq_block_size=settings.gptq.block_size,
                            compute_dtype=loaded.placement.dtype_name, made_by="search")
    overrides = {**compact_overrides(chosen.configs, default),
                 **compact_overrides(setup.tables, LayerConfig())}
    plan = Plan(model=loaded.identity, default=default, overrides=overrides,
                provenance=provenance)
    plan.figures = {
        "chosen": chosen.label,
        "budget_bytes": setup.budget,
        "device": settings.device.name if settings.device else None,
        "max_latency_s": settings.max_latency_s,
        "decode": None if chosen.decode is None else chosen.decode.as_dict(),
        "context": settings.context,
        "batch": settings.batch,
        "footprint": chosen.footprint.as_dict(),
        "predicted_loss_increase": chosen.predicted,
        "holdout": holdout_record(calib_text, calib.source, settings.holdout_windows,
                                  calib.holdout[:settings.final_windows], chosen.measured),
        "candidates": [c.summary() for c in candidates],
        "timings_s": timings,
    }
    return plan


def write_front(out, candidates, front, trials, chosen, loaded, settings) -> None:
    from .pareto import write_pareto

    def record(c: Candidate, source: str | None = None) -> dict:
        m = c.measured or {}
        return {"label": c.label, "source": source or c.source,
                "total_bytes": c.footprint.total, "predicted": c.predicted,
                "kl_fast": c.kl_fast, "kl": m.get("kl"), "ppl": m.get("ppl"),
                "tokens_per_s": c.decode.tokens_per_s if c.decode else None,
                "chosen": c is chosen}

    records = [record(c) for c in candidates] + [record(c, "proxy") for c in front]
    listed = {c.signature for c in candidates}
    for t in trials:  # every other level-2 plan, at its low-fidelity KL
        if t.user_attrs["signature"] in listed:
            continue
        listed.add(t.user_attrs["signature"])
        seconds = t.user_attrs.get("seconds_per_token")
        records.append({"label": f"trial {t.number}", "source": "optuna",
                        "total_bytes": t.user_attrs["total_bytes"],
                        "predicted": t.user_attrs["predicted"], "kl_fast": t.user_attrs["kl_fast"],
                        "kl": None, "ppl": None,
                        "tokens_per_s": 1 / seconds if seconds else None, "chosen": False})
    where = f" on {settings.device.name}" if settings.device else ""
    write_pareto(out, records, title=f"{loaded.name}{where}: quality against memory")
