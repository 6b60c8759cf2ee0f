"""Text -> token windows, for calibration and evaluation.

Sources: a text file (``--calib-text`` / ``--eval-text``), or the embedded default corpus: the
Python documentation topics that ship with CPython (``pydoc_data.topics``), split into
disjoint calibration (about 4/5) and evaluation (about 1/5) parts.

Windows follow the usual perplexity protocol: the whole text tokenized at once with the model's
tokenizer (default special tokens), window i = ids[i*L : (i+1)*L]. Held-out windows for the
search's measured check are taken from the *end* of the calibration stream, so they never
overlap the calibration windows taken from its start, nor the evaluation text.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import AutocompressError

DEFAULT_CORPUS = "pydoc"
EVAL_EVERY = 5  # one run of paragraphs in 5 is evaluation text
EVAL_RUN = 20


def default_corpus(part: str) -> str:
    """The embedded corpus: ``part`` is 'calib' or 'eval'. Topics repeat some paragraphs
    (e.g. 'literals' and 'atom-literals'), so paragraphs are deduplicated first; then runs of
    ``EVAL_RUN`` consecutive paragraphs alternate, one run in ``EVAL_EVERY`` going to
    evaluation. The two parts share no paragraph."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    unique: list[str] = []
    for key in sorted(topics):
        for paragraph in topics[key].split("\n\n"):
            if paragraph.strip() and paragraph.strip() not in seen:
                seen.add(paragraph.strip())
                unique.append(paragraph)
    want_eval = part == "eval"
    chosen = [p for i, p in enumerate(unique)
              if ((i // EVAL_RUN) % EVAL_EVERY == EVAL_EVERY - 1) == want_eval]
    return "\n\n".join(chosen)


def read_text(path: str | Path | None, part: str) -> tuple[str, str]:
    """(text, source label). ``path`` None means the embedded default corpus."""
    if path is None:
        return default_corpus(part), f"{DEFAULT_CORPUS}:{part}"
    path = Path(path)
    if not path.is_file():
        raise AutocompressError(f"text file {str(path)!r} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise AutocompressError(f"text file {str(path)!r} is not UTF-8 text") from None
    if not text.strip():
        raise AutocompressError(f"text file {str(path)!r} is empty")
    return text, str(path)


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """The whole text as one id stream (long texts warn about model length; that is expected)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verbosity = _quiet_transformers()
        try:
            ids = tokenizer(text, return_tensors="pt").input_ids[0]
        finally:
            _restore_transformers(verbosity)
    return ids


def _quiet_transformers() -> int:
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    return level


def _restore_transformers(level: int) -> None:
    from transformers.utils import logging

    logging.set_verbosity(level)


@dataclass
class TokenStream:
    """Token ids of one text, with where they came from."""

    ids: torch.Tensor
    source: str

    @property
    def n_tokens(self) -> int:
        return int(self.ids.numel())

    def max_windows(self, window_len: int) -> int:
        return self.n_tokens // window_len

    def windows(self, n: int, window_len: int, from_end: bool = False) -> torch.Tensor:
        """``n`` non-overlapping windows [n, window_len] from the start (or the end)."""
        available = self.max_windows(window_len)
        if n > available or n < 1:
            raise AutocompressError(
                f"{self.source} has {self.n_tokens} tokens: {available} windows of {window_len}, "
                f"not {n}; use fewer windows, shorter windows or a longer text"
            )
        if from_end:
            start = self.n_tokens - n * window_len
        else:
            start = 0
        return self.ids[start:start + n * window_len].view(n, window_len).clone()


def load_stream(tokenizer: Any, path: str | Path | None, part: str) -> TokenStream:
    text, source = read_text(path, part)
    return TokenStream(tokenize(tokenizer, text), source)


@dataclass
class CalibrationData:
    """Calibration windows and the held-out windows used to check candidate plans."""

    calib: torch.Tensor  # [n_calib, L]
    holdout: torch.Tensor  # [n_holdout, L]
    source: str
    digest: str  # of the calibration windows (the sensitivity cache key)


def calibration_data(tokenizer: Any, path: str | Path | None, n_calib: int, n_holdout: int,
                     window_len: int) -> CalibrationData:
    """Calibration windows from the start of the text, held-out ones from its end (disjoint)."""
    stream = load_stream(tokenizer, path, "calib")
    needed = n_calib + n_holdout
    if needed > stream.max_windows(window_len):
        raise AutocompressError(
            f"{stream.source} has {stream.n_tokens} tokens, fewer than the {needed} windows of "
            f"{window_len} needed ({n_calib} calibration + {n_holdout} held out); give a longer "
            "--calib-text or fewer/shorter windows"
        )
    calib = stream.windows(n_calib, window_len)
    holdout = stream.windows(n_holdout, window_len, from_end=True) if n_holdout else \
        torch.empty(0, window_len, dtype=calib.dtype)
    # the calibration windows alone identify what a sensitivity table was computed from
    return CalibrationData(calib=calib, holdout=holdout, source=stream.source,
                           digest=windows_digest(calib))


def windows_digest(windows: torch.Tensor) -> str:
    """A short digest of token windows: names the exact windows a table or plan was made on."""
    return hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
