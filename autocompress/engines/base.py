"""The engine interface: logits of every position of a token window."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn


class Engine(ABC):
    """Something that runs a language model. ``evaluate`` takes one wherever it takes a torch
    model, so perplexity and KL are computed the same way whatever runs the model."""

    name: str = "engine"

    @abstractmethod
    def window_logits(self, window: torch.Tensor) -> torch.Tensor:
        """Float32 logits [L, vocabulary] for a window of L token ids."""

    def close(self) -> None:
        """Release what the engine holds (native memory, files)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TorchEngine(Engine):
    """A torch causal LM (the fake-quant path the search measures with)."""

    name = "torch"

    def __init__(self, model: nn.Module):
        self.model = model

    @torch.no_grad()
    def window_logits(self, window: torch.Tensor) -> torch.Tensor:
        return self.model(window.unsqueeze(0)).logits[0].float()
