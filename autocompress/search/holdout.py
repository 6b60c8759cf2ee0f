"""The held-out windows a search measured its candidates on, recorded in the plan so that
``autocompress eval PLAN --holdout`` can measure the plan on exactly those windows again and set
its KL beside the one the search reported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..data import windows_digest
from ..errors import AutocompressError


def reported(measured: dict) -> dict[str, Any]:
    """The figures a plan reports for its held-out windows (``eval --holdout`` compares them)."""
    return {k: measured.get(k) for k in ("kl", "ppl", "tokens", "windows")}


def holdout_record(calib_text: str | None, source: str, n_from_end: int, used: torch.Tensor,
                   measured: dict | None) -> dict[str, Any]:
    """``used`` are the first windows of the last ``n_from_end`` windows of the calibration
    text; ``measured`` what the search reported for the chosen plan on them."""
    return {"text": calib_text, "source": source, "from_end": n_from_end,
            "windows": int(used.shape[0]), "window_len": int(used.shape[1]),
            "digest": windows_digest(used),
            "reported": None if measured is None else reported(measured)}


def holdout_windows(tokenizer: Any, plan) -> tuple[torch.Tensor, str, dict | None]:
    """(windows, source label, the search's reported figures) from a search plan's record."""
    from ..data import load_stream

    record = plan.figures.get("holdout")
    if not isinstance(record, dict) or "from_end" not in record:
        raise AutocompressError("this plan records no held-out windows (only plans written by "
                                "`search` do); evaluate with --eval-text instead")
    text = record.get("text")
    if text is not None and not Path(text).is_file():
        raise AutocompressError(f"the plan's held-out windows come from {text}, which is not "
                                "there; evaluate with --eval-text instead")
    stream = load_stream(tokenizer, text, "calib")
    windows = stream.windows(int(record["from_end"]), int(record["window_len"]),
                             from_end=True)[:int(record["windows"])]
    if windows_digest(windows) != record.get("digest"):
        raise AutocompressError(f"the held-out windows of {stream.source} differ from the ones "
                                "the search measured (the text changed)")
    return windows, f"{stream.source} (the search's held-out windows)", record.get("reported")


def windows_held_out_at_end(plan) -> int:
    """How many windows at the end of the plan's calibration text its held-out figures came
    from (none when they came from another text): what must stay unseen by anything trained on
    that text afterwards, such as distillation recovery."""
    holdout = (plan.figures or {}).get("holdout") or {}
    if holdout.get("text") != plan.provenance.calib_text:
        return 0
    from_end = holdout.get("from_end")
    return from_end if isinstance(from_end, int) and from_end > 0 else 0
