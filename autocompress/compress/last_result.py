"""One result kept with the inputs it was computed from, while a ``sharing()`` block is
active: the sensitivity table builds several options of one weight, and the expensive
factorization they share (GPTQ's Hessian factor, the whitened SVD) is computed once."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape \
            and torch.equal(a, b)
    return a == b


class LastResult:
    def __init__(self) -> None:
        self._slot: list | None = None  # None: not sharing; [] or [key, result]

    @contextmanager
    def sharing(self):
        previous, self._slot = self._slot, []
        try:
            yield
        finally:
            self._slot = previous

    def get(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """``compute()``, or the kept result when ``key`` (tensors compared by value) is the
        kept one's; outside ``sharing()`` always ``compute()``."""
        if self._slot is None:
            return compute()
        if self._slot and len(self._slot[0]) == len(key) \
                and all(_same(a, b) for a, b in zip(self._slot[0], key)):
            return self._slot[1]
        result = compute()
        self._slot[:] = [tuple(k.detach().clone() if isinstance(k, Tensor) else k for k in key),
                         result]
        return result
