"""How fast llama.cpp decodes a model's GGUF files on this machine, by type: measured on files
of one type each, used to predict files that mix types (a search's, a recipe's).

A decode step reads every weight once, so its time is taken as

    t(file) = t0 + Σ_types d[type] · (weights stored in that type)

where only differences between types can be measured (every file holds all the model's
weights, so a constant per weight cannot be told apart from t0): d[reference] = 0 and t0 is
the reference file's time. Each type's file stores the block linears in it (llama.cpp's
fallback where rows are short: a K type's file on SmolLM2 is mostly q5_0, which its own file
measures) and the embedding at the reference type; d is the least-squares fit over all files.
The profile belongs to one model (its shapes, its non-matmul work) and one machine and thread
count: `profile --engine llamacpp` writes it, and it is checked against the plan's model.
"""

from __future__ import annotations

import os
import platform
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from ..errors import AutocompressError
from ..gguf_types import type_for_row

REFERENCE = "q8_0"
PROFILE_TYPES = ("f16", "q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0", "iq4_nl",
                 "iq4_xs", "q3_k", "q2_k")


@dataclass
class LlamaCppSpeed:
    model: str
    content_hash: str
    engine: str
    machine: str
    threads: int
    reference: str
    t0_s: float  # seconds per decoded token of the reference file
    per_weight_s: dict[str, float]  # seconds per token per weight, relative to the reference
    files: list[dict] = field(default_factory=list)  # what was measured (type, tok/s, weights)

    def predict_s(self, weights: dict[str, int]) -> float:
        unknown = sorted(set(weights) - set(self.per_weight_s) - {self.reference})
        if unknown:
            raise AutocompressError(f"the llama.cpp speed profile has no figure for "
                                    f"{', '.join(unknown)}; profile those types too")
        return self.t0_s + sum(self.per_weight_s.get(t, 0.0) * w for t, w in weights.items())

    def to_yaml(self) -> str:
        return yaml.safe_dump({"llamacpp_speed": asdict(self)}, sort_keys=False)

    @classmethod
    def load(cls, path: str | Path) -> "LlamaCppSpeed":
        path = Path(path)
        if not path.is_file():
            raise AutocompressError(f"llama.cpp speed profile {str(path)!r} not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))["llamacpp_speed"]
            return cls(**data)
        except (yaml.YAMLError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise AutocompressError(f"{str(path)!r} is not a llama.cpp speed profile "
                                    f"({type(exc).__name__}: {exc}); write one with "
                                    "`autocompress profile --engine llamacpp`") from None


def weights_by_type(entries: list[tuple[str, int, int]]) -> dict[str, int]:
    """entries: (type asked for, rows, row length) per tensor -> weights per stored type."""
    out: dict[str, int] = {}
    for name, rows, n in entries:
        stored = type_for_row(name, n).name
        out[stored] = out.get(stored, 0) + rows * n
    return out


def plan_entries(loaded, configs: dict) -> list[tuple[str, int, int]]:
    """(GGUF type, rows, row length) of every block linear and table of a GGUF plan; a float16
    (identity) entry counts as f16."""
    entries = []
    for info in loaded.layers + loaded.tables:
        cfg = configs.get(info.name)
        name = cfg.gguf if cfg is not None and cfg.is_gguf else "f16"
        entries.append((name, info.out_features, info.in_features))
    return entries


def fit(files: list[dict], reference: str = REFERENCE) -> tuple[float, dict[str, float]]:
    """Least squares of seconds per token on weights per stored type, d[reference] = 0."""
    types = sorted({t for f in files for t in f["weights"]} - {reference})
    a = np.array([[1.0] + [f["weights"].get(t, 0) for t in types] for f in files])
    y = np.array([f["seconds_per_token"] for f in files])
    solution, *_ = np.linalg.lstsq(a, y, rcond=None)
    return float(solution[0]), {t: float(v) for t, v in zip(types, solution[1:])}


def measure_decode(paths: list[Path], threads: int = 2, rounds: int = 5, n_tokens: int = 64,
                   progress: Callable[[str, float], None] | None = None) -> list[float]:
    """Decode tokens/s at batch 1 of each GGUF, measured in rounds: every round decodes every
    file once, and each file's figure is its best round. Interleaving spreads a slow drift of
    the machine (another job, the clock) over all files instead of one, and the best of
    several runs is the undisturbed time (the convention of timeit): identical files measured
    one after another with a median of three differed by up to 39% on this machine."""
    from ..engines.llamacpp import LlamaCppEngine

    engines = []
    try:
        for path in paths:
            engine = LlamaCppEngine(path, n_ctx=n_tokens + 32, threads=threads)
            engines.append(engine)
            engine.decode_tokens_per_s(n_tokens=8)  # warm-up: the weights paged in
        best = [0.0] * len(engines)
        for round_ in range(rounds):
            if progress:
                progress(f"round {round_ + 1}/{rounds}", round_ / rounds)
            for i, engine in enumerate(engines):
                best[i] = max(best[i], engine.decode_tokens_per_s(n_tokens=n_tokens))
        return best
    finally:
        for engine in engines:
            engine.close()


def measure(loaded, types=PROFILE_TYPES, threads: int = 2, rounds: int = 5,
            n_tokens: int = 64, progress: Callable[[str, float], None] | None = None
            ) -> LlamaCppSpeed:
    """Write one GGUF per type (block linears in it, the embedding at the reference type),
    measure llama.cpp's decode of all of them (``measure_decode``), fit the per-type costs."""
    from ..engines.llamacpp import PINNED_VERSION, library_path
    from ..export.gguf import export_gguf
    from ..plan import LayerConfig, Plan

    files, paths = [], []
    with tempfile.TemporaryDirectory(prefix="autocompress-llamacpp-profile-") as tmp:
        for index, name in enumerate(types):
            if progress:
                progress(f"writing {name}", 0.5 * index / len(types))
            plan = Plan(model=loaded.identity, default=LayerConfig(gguf=name),
                        overrides={"model.embed_tokens": {"gguf": REFERENCE}})
            paths.append(Path(tmp) / f"{name}.gguf")
            export_gguf(loaded, plan, paths[-1], progress=False)
            files.append({"type": name, "weights": weights_by_type(
                plan_entries(loaded, plan.resolve_model(loaded)))})
        rates = measure_decode(paths, threads, rounds, n_tokens, progress=None if not progress
                               else lambda what, f: progress(what, 0.5 + 0.5 * f))
    for entry, rate in zip(files, rates):
        entry.update(tokens_per_s=rate, seconds_per_token=1 / rate)
        entry["weights"] = entry.pop("weights")  # keep the file's key order: type, speed, weights
    if progress:
        progress("fit", 1.0)
    t0, per_weight = fit(files)
    return LlamaCppSpeed(
        model=loaded.name, content_hash=loaded.identity.content_hash,
        engine=f"llama.cpp {library_path().name} (xllamacpp {PINNED_VERSION} unless "
               "AUTOCOMPRESS_LLAMA_LIB)",
        machine=f"{platform.machine()}, {os.cpu_count()} cores", threads=threads,
        reference=REFERENCE, t0_s=t0, per_weight_s=per_weight, files=files)
