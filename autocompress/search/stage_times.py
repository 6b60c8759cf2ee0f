"""Seconds per search stage, summed over a search's attempts.

A search interrupted and resumed (``--resume``) reads its sensitivity table from the cache in a
moment and continues its study where it stopped: the time of the finished stages is the
earlier attempts'. Each stage's time is written to ``timings.json`` in the search's directory
as the stage ends, or as it is cut short (an interrupt, a SIGTERM, an error: the time it ran is
kept), and a resumed search adds its own to it, so ``search.json`` reports what the stages cost
in all, however many attempts they took. Only a process killed outright (SIGKILL, the OOM
killer) loses the stage it was in.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

from ..io_utils import atomic_write_text

FILE = "timings.json"


class StageTimes:
    def __init__(self, out: Path | None, resume: bool, log=print):
        self.path = None if out is None else Path(out) / FILE
        self.before: dict[str, float] = {}
        self.now: dict[str, float] = {}
        if resume and self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                if not all(isinstance(v, (int, float)) for v in data.values()):
                    raise ValueError("a stage's seconds are not a number")
                self.before = {k: float(v) for k, v in data.items()}
            except (ValueError, AttributeError) as exc:
                log(f"{self.path} is not readable ({exc}); the earlier attempts' stage times "
                    "are left out")

    @contextmanager
    def stage(self, name: str):
        """Time the block as stage ``name``; its time is written however the block ends."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record(name, time.perf_counter() - start)

    def record(self, stage: str, seconds: float) -> None:
        self.now[stage] = seconds
        if self.path is not None:
            atomic_write_text(self.path, json.dumps(self.totals(), indent=1) + "\n")

    def totals(self) -> dict[str, float]:
        stages = dict.fromkeys([*self.before, *self.now])
        return {k: self.before.get(k, 0.0) + self.now.get(k, 0.0) for k in stages}
