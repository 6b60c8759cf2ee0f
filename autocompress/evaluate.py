"""Perplexity and KL to the uncompressed model over token windows.

Perplexity = exp(mean next-token loss over every predicted token of every window), the protocol
of the README's tables. KL(P_ref || P_model) is averaged over the same positions; the reference
log-probabilities come from the uncompressed model, computed on the fly or cached
(``ReferenceCache``) when one process evaluates many plans.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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
    # each window's mean next-token loss, in window order: two plans measured on the same
    # windows are compared window by window (paired), which resolves far smaller gaps than
    # their perplexities' spread over windows does
    window_nll: list[float] = field(default_factory=list)
    window_kl: list[float] = field(default_factory=list)  # each window's mean KL; [] without

    def as_dict(self) -> dict:
        return {"ppl": self.ppl, "nll": self.nll, "kl": self.kl, "tokens": self.tokens,
                "windows": self.windows, "window_nll": self.window_nll,
                "window_kl": self.window_kl}


# rows of a window's [positions, vocabulary] arrays taken at once where temporaries are made:
# the vocabulary is large (49,152 on SmolLM2, 151,936 on Qwen2.5), a whole window's
# temporary 100-300 MB each
KL_ROWS = 64


def log_softmax_(logits: torch.Tensor) -> torch.Tensor:
    """``F.log_softmax(logits, -1)`` written over ``logits`` (the same kernel, bit for bit; one
    [positions, vocabulary] array instead of two)."""
    if logits.dtype != torch.float32:
        return F.log_softmax(logits.float(), dim=-1)
    return torch.log_softmax(logits, -1, out=logits)


def log_probs(model, window: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities [L-1, V] of a torch model or any ``engines.base.Engine``."""
    if hasattr(model, "window_logits"):  # an Engine (llama.cpp, ...)
        logits = model.window_logits(window)[:-1]
    else:
        from .placement import on_device_of
        from .residency import streamed

        with streamed(model):  # one block's weights in memory at a time (residency.py)
            logits = model(on_device_of(model, window).unsqueeze(0)).logits[0, :-1]
    return log_softmax_(logits)


def window_sums(logp: torch.Tensor, window: torch.Tensor, ref: torch.Tensor | None
                ) -> tuple[float, float, int]:
    """(summed next-token loss, summed KL(ref || model), predicted tokens) of one window. The
    KL is summed ``KL_ROWS`` positions at a time (its temporaries are the size of those rows,
    not of the window's vocabulary array three times over)."""
    targets = window[1:].to(logp.device)
    nll = -logp.gather(1, targets.unsqueeze(1)).sum().item()
    kl = 0.0
    if ref is not None:
        ref = ref.to(logp.device)  # an engine's CPU logits against a model's on a GPU
        for start in range(0, logp.shape[0], KL_ROWS):
            r, lp = ref[start:start + KL_ROWS], logp[start:start + KL_ROWS]
            kl += (r.exp() * (r - lp)).sum().item()
    return nll, kl, targets.numel()


class ReferenceCache:
    """The uncompressed model's next-token log-probabilities per window, for one process that
    measures many plans against it.

    Kept as what the model's head reads (its hidden state per position) and put through the
    head again on each use: the hidden size, not the vocabulary, per position (576 against
    49,152 floats on SmolLM2, 1,536 against 151,936 on Qwen2.5-1.5B), for one head matmul per
    window and use. The head sees the same input tensor as in the model's forward, so the
    log-probabilities are bit for bit those of the forward; where they are not (a model that
    scales or caps its logits after the head), the cache keeps the log-probabilities
    themselves, in float32 (not bfloat16: its rounding of log-probabilities biases small KLs,
    8-bit plans, by more than their size)."""

    def __init__(self, model: nn.Module, windows: torch.Tensor):
        self.model = model
        self.windows = windows
        self._head = getattr(model, "lm_head", None)
        if not isinstance(self._head, nn.Linear):
            self._head = None
        self._hidden: dict[int, torch.Tensor] = {}
        self._log_probs: dict[int, torch.Tensor] = {}
        # the head is run again on each use: its tensors as they were when the cache was made
        # (a plan compressed in place swaps new tensors into the model and keeps these intact;
        # a write into these themselves is refused)
        self._head_state = None if self._head is None else (
            self._head.weight.detach(), None if self._head.bias is None else
            self._head.bias.detach(), self._head.weight._version)

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds."""
        return sum(t.numel() * t.element_size()
                   for store in (self._hidden, self._log_probs) for t in store.values())

    @torch.no_grad()
    def get(self, index: int) -> torch.Tensor:
        if index in self._hidden:
            return self._through_head(self._hidden[index])
        if index in self._log_probs:
            return self._log_probs[index]
        return self._compute(index)

    def _through_head(self, hidden: torch.Tensor) -> torch.Tensor:
        weight, bias, version = self._head_state
        if weight._version != version:
            raise RuntimeError("the reference model's head changed after its ReferenceCache was "
                               "made: the cache recomputes log-probabilities through it")
        from .residency import release

        logits = F.linear(hidden, weight, bias)
        release([weight])  # read whole for this window: a file view goes back (residency.py)
        return log_softmax_(logits[0, :-1])

    def fill(self, progress: bool = False, desc: str = "reference") -> "ReferenceCache":
        """Compute every window now, while the model is the reference (before a plan is
        compressed into it in place)."""
        for index in tqdm(range(self.windows.shape[0]), desc=desc, leave=False,
                          disable=not progress or self.complete):
            self.get(index)
        return self

    @property
    def complete(self) -> bool:
        return len(self._hidden) + len(self._log_probs) == self.windows.shape[0]

    def saved(self, index: int) -> dict[str, torch.Tensor]:
        """What the cache keeps of window ``index``, to write to a file: the head's input
        (``hidden``) or the log-probabilities themselves (``logp``)."""
        self.get(index)
        if index in self._hidden:
            return {"hidden": self._hidden[index]}
        return {"logp": self._log_probs[index]}

    @classmethod
    def from_saved(cls, model: nn.Module, windows: torch.Tensor,
                   saved: list[dict[str, torch.Tensor]]) -> "ReferenceCache":
        """A cache from ``saved`` entries, with ``model`` the same uncompressed model (loaded
        again elsewhere: a Ray worker), whose head the hidden states go through."""
        from .placement import model_device

        cache, device = cls(model, windows), model_device(model)
        saved = [{k: v.to(device) for k, v in entry.items()} for entry in saved]
        for index, entry in enumerate(saved):
            if "hidden" in entry:
                if cache._head is None:
                    raise ValueError("saved hidden states need the model's lm_head")
                cache._hidden[index] = entry["hidden"]
            else:
                cache._log_probs[index] = entry["logp"]
        return cache

    def _compute(self, index: int) -> torch.Tensor:
        from .compress.apply import IN_PLACE

        if getattr(self.model, IN_PLACE, False):
            raise RuntimeError("the reference model holds a compressed plan in place: fill() "
                               "the ReferenceCache before compressing")
        window = self.windows[index]
        if self._head is None or self._log_probs:  # no head, or its output is not the logits
            self._log_probs[index] = log_probs(self.model, window)
            return self._log_probs[index]
        seen: list[torch.Tensor] = []
        handle = self._head.register_forward_hook(
            lambda _module, inputs, _output: seen.append(inputs[0].detach().clone()))
        try:
            logp = log_probs(self.model, window)
        finally:
            handle.remove()
        if len(seen) == 1 and torch.equal(self._through_head(seen[0]), logp):
            self._hidden[index] = seen[0]
        else:
            self._log_probs[index] = logp
        return logp


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, reference: nn.Module | ReferenceCache | None = None,
             progress: bool = True, desc: str = "eval") -> EvalResult:
    """Perplexity of ``model`` (a torch model or an Engine) on ``windows`` [n, L]; KL to
    ``reference`` when given."""
    if isinstance(reference, ReferenceCache) and not torch.equal(reference.windows, windows):
        raise ValueError("ReferenceCache was built for other windows")
    total_nll, total_kl, total_tokens = 0.0, 0.0, 0
    window_nll, window_kl = [], []
    for i in tqdm(range(windows.shape[0]), desc=desc, disable=not progress, leave=False):
        window = windows[i]
        logp = log_probs(model, window)
        ref = None
        if reference is not None:
            ref = reference.get(i) if isinstance(reference, ReferenceCache) \
                else log_probs(reference, window)
        nll, kl, tokens = window_sums(logp, window, ref)
        window_nll.append(nll / tokens)
        if ref is not None:
            window_kl.append(kl / tokens)
        total_nll, total_kl, total_tokens = total_nll + nll, total_kl + kl, total_tokens + tokens
    nll = total_nll / total_tokens
    return EvalResult(
        ppl=math.exp(nll),
        nll=nll,
        kl=total_kl / total_tokens if reference is not None else None,
        tokens=total_tokens,
        windows=int(windows.shape[0]),
        window_nll=window_nll,
        window_kl=window_kl,
    )
