"""The results store and the number formats every README table shares."""

from __future__ import annotations

from pathlib import Path

from results_schema import Results, validate

LABELS = {
    "base": "uncompressed (float; weights already Q4_1-rounded)",
    "rtn8": "RTN 8-bit", "rtn4": "RTN 4-bit", "rtn3": "RTN 3-bit", "rtn2": "RTN 2-bit",
    "gptq4": "GPTQ 4-bit", "gptq3": "GPTQ 3-bit", "gptq2": "GPTQ 2-bit",
    "wanda50": "Wanda 50% unstructured (fp16 values)", "wanda2:4": "Wanda 2:4 (fp16 values)",
    "svd0.5": "SVD rank ratio 0.5, whitened (fp16 factors)",
    "search@rtn3": "`search` at the total bytes of RTN 3-bit",
}


# the search engine's timings_s keys, in the order it runs them (older versions wrote solve_s)
TIMINGS = {"sensitivity_s": "sensitivity", "solve_s": "solve", "level1_s": "level 1 (proxy)",
           "level2_s": "level 2 (Optuna)", "level3_s": "level 3 (Ray Tune)",
           "measure_s": "measured check"}


# proxy_fidelity's calibrated families (level 2's knobs)
FAMILIES = {"w_2bit": "2-bit options", "w_3bit": "3-bit", "w_sparse": "sparse", "w_2to4": "2:4",
            "w_lowrank": "low rank", "w_coarse": "coarse groups", "w_gptq": "GPTQ"}


NOT_MEASURED = "(not measured yet)"


class Store:
    """The results directory: each file validated once, on first use."""

    def __init__(self, root: Path):
        self.root = root
        self._cache: dict[str, Results] = {}

    def get(self, name: str) -> Results:
        if name not in self._cache:
            self._cache[name] = validate(self.root / name)
        return self._cache[name]

    def has(self, name: str) -> bool:
        return (self.root / name).is_file()

    def glob(self, pattern: str) -> list[Results]:
        return [self.get(p.name) for p in sorted(self.root.glob(pattern))]


def _fmt_ppl(ppl: float) -> str:
    return f"{ppl:.3g}" if ppl >= 1e4 else f"{ppl:.2f}"


def _secs(s: float) -> str:
    return f"{s:.1f}" if s < 10 else f"{s:.0f}"


def _range(values, fmt: str = ".1f", sep: str = "–") -> str:
    lo, hi = min(values), max(values)
    return f"{lo:{fmt}}" if f"{lo:{fmt}}" == f"{hi:{fmt}}" else f"{lo:{fmt}}{sep}{hi:{fmt}}"


def _timings(t: dict[str, float]) -> str:
    """Every timing the engine wrote, in its order; none is made up for the ones it did not."""
    known = [f"{TIMINGS[k]} {_secs(t[k])} s" for k in TIMINGS if k in t]
    other = [f"{k.removesuffix('_s')} {_secs(v)} s" for k, v in t.items() if k not in TIMINGS]
    return ", ".join(known + other) or "not recorded"


def _quartered(steps: list[int]) -> str:
    """Where a recovery's validation stalled and its rate was quartered ("" when it never
    did): one phrase for every table that shows a recovery's rate."""
    if not steps:
        return ""
    plural = "s" if len(steps) > 1 else ""
    return f" (quartered at step{plural} {', '.join(map(str, steps))}: validation had stalled)"


def _rate_path(lr: float, abandoned: list[float] | None, lowered: int = 0) -> str:
    """The rates a recovery went through: those it backed off from, those a stall quartered
    (``lowered`` times), then the one it ended at."""
    stalled = [lr * 4 ** (lowered - i) for i in range(lowered)]
    return " → ".join(f"{r:g}" for r in [*(abandoned or []), *stalled, lr])
