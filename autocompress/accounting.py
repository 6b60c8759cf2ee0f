"""Exact bytes of a compressed layer, and the whole inference footprint of a plan.

Storage format counted (what the packed runtime stores):
- values: kept weights at ``bits`` each (16 = float16);
- quantization parameters: per group a float16 scale, plus a float16 zero point when asymmetric
  (symmetric grids have a fixed zero); ``ceil(in / group)`` groups per row;
- sparsity metadata: unstructured = a bitmap, 1 bit per dense position; 2:4 = 2 bits per kept
  value (the index of each kept weight within its group of 4, as NVIDIA's sparse tensor cores);
- low rank: A [out, r] and B [r, in], each stored with the layer's bits, groups and sparsity.
Each matrix is rounded up to whole bytes.

A GGUF type (``cfg.gguf``) is counted by its block layout instead: whole blocks of the type (or
of llama.cpp's fallback type when a row is not a multiple of its block) per row.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from .gguf_types import matrix_bytes as gguf_matrix_bytes
from .plan import LayerConfig

FP16_BITS = 16


def rank_for(out_features: int, in_features: int, rank_ratio: float) -> int:
    """Rank whose factors hold ``rank_ratio`` of the dense parameter count."""
    return max(1, math.floor(rank_ratio * out_features * in_features / (out_features + in_features)))


def n_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def kept_per_row(in_features: int, cfg: LayerConfig) -> int:
    if cfg.pattern == "2:4":
        return in_features // 2
    return in_features - round(cfg.sparsity * in_features)


def matrix_bits(out_features: int, in_features: int, cfg: LayerConfig) -> int:
    """Storage bits of one [out, in] matrix under ``cfg`` (low rank not applied here)."""
    kept = out_features * kept_per_row(in_features, cfg)
    bits = kept * cfg.bits
    if cfg.bits < 16:
        per_group = FP16_BITS if cfg.sym else 2 * FP16_BITS
        bits += out_features * n_groups(in_features, cfg.group_size) * per_group
    if cfg.pattern == "2:4":
        bits += kept * 2
    elif cfg.sparsity > 0:
        bits += out_features * in_features
    return bits


def layer_bytes(out_features: int, in_features: int, cfg: LayerConfig) -> int:
    """Exact bytes of a linear layer's weight under ``cfg`` (including low-rank factors)."""
    if cfg.is_gguf:
        return gguf_matrix_bytes(cfg.gguf, out_features, in_features)
    if cfg.is_low_rank:
        r = rank_for(out_features, in_features, cfg.rank_ratio)
        return (math.ceil(matrix_bits(out_features, r, cfg) / 8)
                + math.ceil(matrix_bits(r, in_features, cfg) / 8))
    # awq: the input scale, one float16 per input column
    scales = 2 * in_features if cfg.awq else 0
    return math.ceil(matrix_bits(out_features, in_features, cfg) / 8) + scales


@dataclass
class ModelDims:
    """What the memory model needs to know about a model (from its config)."""

    n_blocks: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config: Any) -> "ModelDims":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            n_blocks=config.num_hidden_layers,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            n_heads=heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            vocab=config.vocab_size,
        )


@dataclass
class Footprint:
    """Whole inference memory of a plan, in bytes."""

    layer_weights: int  # block linears at the plan's formats
    other_weights: int  # embeddings, norms, head (float16 unless the plan compresses the head)
    kv_cache: int
    workspace: int
    runtime_overhead: int

    @property
    def weights(self) -> int:
        return self.layer_weights + self.other_weights

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.workspace + self.runtime_overhead

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "weights": self.weights, "total": self.total}


def kv_cache_bytes(dims: ModelDims, context: int, batch: int, kv_bits: int = 16) -> int:
    """K and V for every block, every KV head, every position of the context."""
    return math.ceil(2 * dims.n_blocks * dims.n_kv_heads * dims.head_dim * context * batch
                     * kv_bits / 8)


def workspace_bytes(dims: ModelDims, context: int, batch: int, prefill_chunk: int = 512) -> int:
    """Activation buffers of a chunked prefill (the peak; decode needs less): the hidden states
    and MLP intermediates of one chunk in float16, attention scores of the chunk against the
    whole context in float16, and the float32 logits of the last position."""
    chunk = min(prefill_chunk, context)
    hidden_states = batch * chunk * (4 * dims.hidden + 3 * dims.intermediate) * 2
    scores = batch * dims.n_heads * chunk * context * 2
    logits = batch * dims.vocab * 4
    return hidden_states + scores + logits


def footprint(layer_shapes: Iterable[tuple[int, int]], configs: Iterable[LayerConfig],
              other_params: int, dims: ModelDims, context: int = 2048, batch: int = 1,
              head_bytes: int = 0, runtime_overhead: int = 0) -> Footprint:
    """``other_params`` excludes the head when ``head_bytes`` accounts for it separately."""
    layer_total = sum(layer_bytes(o, i, cfg) for (o, i), cfg in zip(layer_shapes, configs))
    return Footprint(
        layer_weights=layer_total,
        other_weights=other_params * 2 + head_bytes,
        kv_cache=kv_cache_bytes(dims, context, batch),
        workspace=workspace_bytes(dims, context, batch),
        runtime_overhead=runtime_overhead,
    )


def model_footprint(loaded, configs: dict[str, LayerConfig], context: int = 2048, batch: int = 1,
                    runtime_overhead: int = 0) -> Footprint:
    """Footprint of ``loaded`` (a model.LoadedModel) with its block linears at ``configs``;
    the embedding and an untied head at theirs when ``configs`` names them (else float16)."""
    from .model import non_layer_params

    layers = loaded.layers
    other_params, table_bytes = non_layer_params(loaded), 0
    for table in loaded.tables:
        if table.name in configs and not configs[table.name].is_identity:
            other_params -= table.n_params
            table_bytes += layer_bytes(*table.shape, configs[table.name])
    return footprint(
        [layer.shape for layer in layers], [configs[layer.name] for layer in layers],
        other_params=other_params, dims=ModelDims.from_config(loaded.config),
        context=context, batch=batch, head_bytes=table_bytes, runtime_overhead=runtime_overhead,
    )
