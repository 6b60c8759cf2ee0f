"""Perplexity and KL to the uncompressed model over token windows.

Perplexity = exp(mean next-token loss over every predicted token of every window), the protocol
of the README's tables. KL(P_ref || P_model) is averaged over the same positions; the reference
log-probabilities come from the uncompressed model, computed on the fly or cached
(``ReferenceCache``) when one process evaluates many plans.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@dataclass
class EvalResult:
    ppl: float
    nll: float  # mean next-token loss (nats)
    kl: float | None  # mean KL(P_ref || P_model) per predicted token (nats)
    tokens: int  # predicted tokens
    windows: int

    def as_dict(self) -> dict:
        return {"ppl": self.ppl, "nll": self.nll, "kl": self.kl, "tokens": self.tokens,
                "windows": self.windows}


def log_probs(model, window: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities [L-1, V] of a torch model or any ``engines.base.Engine``."""
    if hasattr(model, "window_logits"):  # an Engine (llama.cpp, ...)
        logits = model.window_logits(window)[:-1]
    else:
        logits = model(window.unsqueeze(0)).logits[0, :-1].float()
    return F.log_softmax(logits, dim=-1)


def window_sums(logp: torch.Tensor, window: torch.Tensor, ref: torch.Tensor | None
                ) -> tuple[float, float, int]:
    """(summed next-token loss, summed KL(ref || model), predicted tokens) of one window."""
    targets = window[1:]
    nll = -logp.gather(1, targets.unsqueeze(1)).sum().item()
    kl = (ref.exp() * (ref - logp)).sum().item() if ref is not None else 0.0
    return nll, kl, targets.numel()


class ReferenceCache:
    """Log-probabilities of the uncompressed model per window, in float32: 4 bytes per vocabulary
    entry and position (4 windows of 512 tokens of a 49k vocabulary: 400 MB). Not bfloat16: its
    rounding of log-probabilities biases small KLs (8-bit plans) by more than their size."""

    def __init__(self, model: nn.Module, windows: torch.Tensor):
        self.model = model
        self.windows = windows
        self._store: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def get(self, index: int) -> torch.Tensor:
        if index not in self._store:
            self._store[index] = log_probs(self.model, self.windows[index])
        return self._store[index]


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, reference: nn.Module | ReferenceCache | None = None,
             progress: bool = True, desc: str = "eval") -> EvalResult:
    """Perplexity of ``model`` (a torch model or an Engine) on ``windows`` [n, L]; KL to
    ``reference`` when given."""
    if isinstance(reference, ReferenceCache) and not torch.equal(reference.windows, windows):
        raise ValueError("ReferenceCache was built for other windows")
    total_nll, total_kl, total_tokens = 0.0, 0.0, 0
    for i in tqdm(range(windows.shape[0]), desc=desc, disable=not progress, leave=False):
        window = windows[i]
        logp = log_probs(model, window)
        ref = None
        if reference is not None:
            ref = reference.get(i) if isinstance(reference, ReferenceCache) \
                else log_probs(reference, window)
        nll, kl, tokens = window_sums(logp, window, ref)
        total_nll, total_kl, total_tokens = total_nll + nll, total_kl + kl, total_tokens + tokens
    nll = total_nll / total_tokens
    return EvalResult(
        ppl=math.exp(nll),
        nll=nll,
        kl=total_kl / total_tokens if reference is not None else None,
        tokens=total_tokens,
        windows=int(windows.shape[0]),
    )
