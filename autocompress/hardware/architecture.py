"""What the hardware models need to know about a model: its linear layers' shapes, its other
weights and its attention geometry, from a loaded model or from a ``config.json`` alone.

From a config, the layer names are those transformers gives a Llama-style decoder
(``model.layers.N.self_attn.q_proj`` ... ``mlp.down_proj``), so a plan written for the real model
resolves against the estimate of the same model without loading its weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..accounting import ModelDims
from ..errors import AutocompressError
from ..model import EMBEDDING, LayerInfo

LLAMA_LAYERS = (("self_attn.q_proj", "q"), ("self_attn.k_proj", "k"), ("self_attn.v_proj", "v"),
                ("self_attn.o_proj", "o"), ("mlp.gate_proj", "gate"), ("mlp.up_proj", "up"),
                ("mlp.down_proj", "down"))
LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "granite", "olmo", "phi3")


@dataclass
class Architecture:
    name: str
    dims: ModelDims
    layers: list[LayerInfo]  # block linears, forward order
    other_params: int  # embeddings, norms, head (counted once when tied)
    tied_embeddings: bool

    @property
    def head_params(self) -> int:
        return self.dims.vocab * self.dims.hidden

    @property
    def tables(self) -> list[LayerInfo]:
        """The embedding and, when it is not tied to it, the head: as LoadedModel.tables."""
        vocab, hidden = self.dims.vocab, self.dims.hidden
        out = [LayerInfo(EMBEDDING, "embed", None, vocab, hidden)]
        if not self.tied_embeddings:
            out.append(LayerInfo("lm_head", "lm_head", None, vocab, hidden))
        return out

    @classmethod
    def from_loaded(cls, loaded) -> "Architecture":
        from ..model import non_layer_params

        config = loaded.config
        return cls(
            name=loaded.name,
            dims=ModelDims.from_config(config),
            layers=list(loaded.layers),
            other_params=non_layer_params(loaded),
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )

    @classmethod
    def from_config(cls, config: dict[str, Any], name: str = "model") -> "Architecture":
        """A Llama-style decoder described by its HF config (a dict)."""
        model_type = config.get("model_type", "llama")
        if model_type not in LLAMA_TYPES:
            raise AutocompressError(
                f"config model_type {model_type!r} is not a Llama-style decoder this estimate "
                f"knows ({', '.join(LLAMA_TYPES)})")
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            dims = ModelDims(
                n_blocks=int(config["num_hidden_layers"]), hidden=hidden,
                intermediate=int(config["intermediate_size"]), n_heads=heads,
                n_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                vocab=int(config["vocab_size"]))
        except KeyError as exc:
            raise AutocompressError(f"config has no {exc.args[0]!r}; give a model's config.json") \
                from None
        q_out = dims.n_heads * dims.head_dim
        kv_out = dims.n_kv_heads * dims.head_dim
        shapes = {"q": (q_out, hidden), "k": (kv_out, hidden), "v": (kv_out, hidden),
                  "o": (hidden, q_out), "gate": (dims.intermediate, hidden),
                  "up": (dims.intermediate, hidden), "down": (hidden, dims.intermediate)}
        layers = [LayerInfo(f"model.layers.{b}.{suffix}", kind, b, *shapes[kind])
                  for b in range(dims.n_blocks) for suffix, kind in LLAMA_LAYERS]
        tied = bool(config.get("tie_word_embeddings", False))
        embeddings = dims.vocab * hidden * (1 if tied else 2)
        norms = (2 * dims.n_blocks + 1) * hidden
        return cls(name=name, dims=dims, layers=layers, other_params=embeddings + norms,
                   tied_embeddings=tied)


def read_config(path: str | Path) -> Architecture:
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        config = json.loads(path.read_text())
    except OSError as exc:
        raise AutocompressError(f"cannot read model config {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise AutocompressError(f"model config {path} is not valid JSON (line {exc.lineno})") \
            from None
    if not isinstance(config, dict):
        raise AutocompressError(f"model config {path} must be a JSON object")
    name = config.get("_name_or_path") or path.stem if path.name != "config.json" \
        else path.parent.name
    return Architecture.from_config(config, name=str(name))
