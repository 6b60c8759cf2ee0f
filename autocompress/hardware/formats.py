"""Which storage format a layer runs in, and its bytes: the key that links a plan's layers to a
device profile's kernels (``formats``) and measured latencies (``lookup``)."""

from __future__ import annotations

import dataclasses

from ..accounting import layer_bytes
from ..plan import LayerConfig

FLOAT_BYTES = {"f32": 4, "bf16": 2, "f16": 2}


def layer_format(cfg: LayerConfig, float_dtype: str = "f16") -> str:
    """``q4``, ``q4+2:4``, ``q3+sparse``; 16-bit layers run in the engine's float dtype; a
    GGUF type is its own format (``q4_k``), named as llama.cpp names it."""
    if cfg.is_gguf:
        return cfg.gguf
    base = float_dtype if cfg.bits == 16 else f"q{cfg.bits}"
    if cfg.pattern == "2:4":
        return base + "+2:4"
    if cfg.sparsity > 0:
        return base + "+sparse"
    return base


def base_format(fmt: str) -> str:
    return fmt.split("+", 1)[0]


def format_config(fmt: str) -> LayerConfig:
    """The LayerConfig of a plain (dense) format name: the head and embeddings' formats."""
    base = base_format(fmt)
    bits = 16 if base in FLOAT_BYTES else int(base[1:])
    return LayerConfig(bits=bits, group_size=64)


def held_config(cfg: LayerConfig, bits: int) -> LayerConfig:
    """``cfg`` as an engine holds it in a dense ``bits``-bit container (widened codes, pruned
    weights stored as zeros): same groups and rank, explicit zero points, no sparsity."""
    return dataclasses.replace(cfg, bits=bits, sym=False, sparsity=0.0, pattern="unstructured")


def format_bytes(fmt: str, out_features: int, in_features: int) -> int:
    """Bytes of a dense [out, in] matrix stored in ``fmt`` (quantized: group 64, asymmetric)."""
    base = base_format(fmt)
    if base in FLOAT_BYTES:
        return FLOAT_BYTES[base] * out_features * in_features
    return layer_bytes(out_features, in_features, format_config(fmt))
