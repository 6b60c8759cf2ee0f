"""Where a Hugging Face Llama tensor lives in a GGUF file, and in which row order.

GGUF names tensors ``blk.N.attn_q.weight`` and so on, and llama.cpp's converter reorders the
rows of q and k (each head's two rotary halves interleaved the way llama.cpp applies RoPE).
transformers undoes that when it reads a GGUF; writing one (``export --format gguf``) must do
it again. Row order does not change a row's values, so every GGUF type (blocks run along
rows) quantizes a reordered matrix to the reordered quantization of the original.
"""

from __future__ import annotations

import re

import numpy as np

_BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_IN_BLOCK = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(hf_name: str) -> str:
    """``model.layers.3.mlp.down_proj.weight`` -> ``blk.3.ffn_down.weight``."""
    stem, _, suffix = hf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        raise KeyError(f"no GGUF name for {hf_name!r}")
    if stem in _TOP:
        return f"{_TOP[stem]}.{suffix}"
    match = _BLOCK.match(stem)
    if match and match.group(2) in _IN_BLOCK:
        return f"blk.{match.group(1)}.{_IN_BLOCK[match.group(2)]}.{suffix}"
    raise KeyError(f"no GGUF name for {hf_name!r}")


def _heads(hf_name: str, n_head: int, n_head_kv: int) -> int | None:
    if ".self_attn.q_proj." in hf_name:
        return n_head
    if ".self_attn.k_proj." in hf_name:
        return n_head_kv
    return None


def to_gguf_rows(hf_name: str, tensor: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """The tensor in the row order llama.cpp's converter writes (q and k reordered)."""
    heads = _heads(hf_name, n_head, n_head_kv)
    if heads is None:
        return tensor
    shape = tensor.shape
    return (tensor.reshape(heads, 2, shape[0] // heads // 2, *shape[1:])
            .swapaxes(1, 2).reshape(shape))


def from_gguf_rows(hf_name: str, tensor: np.ndarray, n_head: int, n_head_kv: int
                   ) -> np.ndarray:
    """The inverse of ``to_gguf_rows``: a GGUF tensor in Hugging Face's row order."""
    heads = _heads(hf_name, n_head, n_head_kv)
    if heads is None:
        return tensor
    shape = tensor.shape
    return (tensor.reshape(heads, shape[0] // heads // 2, 2, *shape[1:])
            .swapaxes(1, 2).reshape(shape))
