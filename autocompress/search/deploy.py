"""The last step of a GGUF search: the chosen plan written as the GGUF the user deploys
(``model.gguf`` beside plan.json), and measured by llama.cpp on the held-out windows the
search measured it on in torch, so the figure the search reports is confirmed by the engine
that will run the file."""

from __future__ import annotations

from pathlib import Path

from ..evaluate import evaluate
from ..model import LoadedModel
from ..plan import Plan
from .holdout import holdout_windows

GGUF_FILE = "model.gguf"


def exports_gguf(plan: Plan, loaded: LoadedModel) -> bool:
    """Every block linear in a GGUF type or float16 (what `export --format gguf` writes)."""
    configs = plan.resolve(layer.name for layer in loaded.layers).values()
    return all(cfg.is_gguf or cfg.is_identity for cfg in configs) and \
        any(cfg.is_gguf for cfg in configs)


def export_and_confirm(loaded: LoadedModel, plan: Plan, out_dir: str | Path,
                       progress: bool = True) -> dict:
    """Write OUT/model.gguf, run it in llama.cpp on the search's held-out windows (KL to the
    uncompressed model in torch), record the figures in the plan (saved again) and return
    them."""
    from ..compress.reproduce import build_recipe
    from ..engines.llamacpp import LlamaCppEngine
    from ..export.gguf import export_gguf

    out = Path(out_dir)
    made = export_gguf(loaded, plan, out / GGUF_FILE, build_recipe(loaded, plan),
                       progress=progress)
    windows, _, _ = holdout_windows(loaded.tokenizer, plan)  # the ones the search measured on
    engine = LlamaCppEngine(made.path, n_ctx=int(windows.shape[1]))
    try:
        result = evaluate(engine, windows, reference=loaded.model, progress=progress,
                          desc="llama.cpp check")
    finally:
        engine.close()
    figures = {"gguf": GGUF_FILE, "file_bytes": made.file_bytes, "types": made.types,
               "ppl": result.ppl, "kl": result.kl, "windows": result.windows,
               "tokens": result.tokens}
    plan.figures["llamacpp"] = figures
    plan.save(out / "plan.json")
    return figures
