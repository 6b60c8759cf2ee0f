"""Compression operators for one linear layer: quantization (RTN, GPTQ), pruning, low rank."""

from .gptq import GPTQ
from .lowrank import low_rank_factors, rank_for, truncated_factors
from .prune import magnitude_mask, mask_from_scores, prune, wanda_mask
from .quant import (
    QuantizedWeight,
    dequantize_codes,
    expand_groups,
    fake_quantize,
    group_params,
    n_groups,
    quant_error_many,
    quantize_rtn,
    quantize_with_params,
)
from .weights import (
    CompressedLayer,
    CompressedMatrix,
    GPTQSettings,
    LayerStats,
    compress_matrix,
    compress_weight,
)

__all__ = [
    "GPTQ",
    "GPTQSettings",
    "CompressedLayer",
    "CompressedMatrix",
    "LayerStats",
    "QuantizedWeight",
    "compress_matrix",
    "compress_weight",
    "dequantize_codes",
    "expand_groups",
    "fake_quantize",
    "group_params",
    "low_rank_factors",
    "magnitude_mask",
    "mask_from_scores",
    "n_groups",
    "prune",
    "quant_error_many",
    "quantize_rtn",
    "quantize_with_params",
    "rank_for",
    "truncated_factors",
    "wanda_mask",
]
