"""What a GGUF export of a Hugging Face Llama directory carries besides the plan's matrices:
llama.cpp's `llama.*` metadata from config.json, the byte-level BPE tokenizer (tokens, types,
merges, special ids, chat template) from tokenizer.json, and the norms and biases as float32.

A model loaded from a GGUF carries its source file's metadata instead (export/gguf.py); this
is the path for a model that never was a GGUF (a fine-tune, a random test model). What it
does not know it refuses with one line pointing to llama.cpp's converter: another
architecture, a RoPE scaling scheme (llama.cpp would need its rope_freqs tensor), a
SentencePiece or WordPiece tokenizer. The pre-tokenizer's name (`tokenizer.ggml.pre`, which
llama.cpp's converter finds by hashing the tokenizer's output on a probe text) is written as
"gpt-2" for GPT-2's own byte-level regex and "default" otherwise: it changes how llama.cpp
splits new text, not the logits of given token ids, which is what `eval` measures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from ..errors import AutocompressError
from ..model import LoadedModel
from .gguf_layout import gguf_name, to_gguf_rows

CONVERTER = ("llama.cpp's convert_hf_to_gguf.py (write an f16 GGUF) and pass that file as "
             "--model")
ARCH = "llama"


@dataclass(frozen=True)
class Field:
    """One metadata key as gguf-py's writer takes it."""
    name: str
    value: object
    type: int  # GGUFValueType
    sub_type: int | None = None


def hf_fields(loaded: LoadedModel) -> list[Field]:
    """config.json and tokenizer.json as GGUF metadata (llama architecture)."""
    from gguf import GGUFValueType as T

    config = loaded.config
    if getattr(config, "model_type", None) != ARCH:
        raise AutocompressError(
            f"GGUF export of a Hugging Face directory knows the llama architecture, and "
            f"{loaded.spec!r} is {getattr(config, 'model_type', 'unknown')!r}: convert it "
            f"with {CONVERTER}")
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
                or {})
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise AutocompressError(
            f"{loaded.spec!r} uses RoPE scaling {rope.get('rope_type') or rope.get('type')!r}, "
            f"which llama.cpp reads from a tensor this export does not write: convert it with "
            f"{CONVERTER}")
    theta = rope.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    u32 = [("context_length", config.max_position_embeddings),
           ("embedding_length", config.hidden_size),
           ("block_count", config.num_hidden_layers),
           ("feed_forward_length", config.intermediate_size),
           ("attention.head_count", heads),
           ("attention.head_count_kv", getattr(config, "num_key_value_heads", None) or heads),
           ("vocab_size", config.vocab_size),
           ("rope.dimension_count", head_dim)]
    if head_dim != config.hidden_size // heads:
        u32 += [("attention.key_length", head_dim), ("attention.value_length", head_dim)]
    fields = [Field("general.name", loaded.name, T.STRING)]
    fields += [Field(f"{ARCH}.{key}", int(value), T.UINT32) for key, value in u32]
    fields += [Field(f"{ARCH}.rope.freq_base", float(theta), T.FLOAT32),
               Field(f"{ARCH}.attention.layer_norm_rms_epsilon", float(config.rms_norm_eps),
                     T.FLOAT32)]
    return fields + tokenizer_fields(loaded)


def tokenizer_fields(loaded: LoadedModel) -> list[Field]:
    from gguf import GGUFValueType as T
    from gguf import TokenType

    tokenizer = loaded.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not _byte_level(spec.get("pre_tokenizer")):
        raise AutocompressError(
            f"GGUF export of a Hugging Face directory writes byte-level BPE tokenizers (GPT-2, "
            f"Llama 3, Qwen, SmolLM), and {loaded.spec!r} has "
            f"{model.get('type') or type(tokenizer).__name__}: convert it with {CONVERTER}")
    n_vocab = loaded.config.vocab_size
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]  # ids the tokenizer leaves unused
    types = [int(TokenType.UNUSED)] * n_vocab
    for text, index in model["vocab"].items():
        if index < n_vocab:
            tokens[index], types[index] = text, int(TokenType.NORMAL)
    for added in spec.get("added_tokens") or ():
        if added["id"] < n_vocab:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = int(TokenType.CONTROL if added.get("special")
                                     else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or ()]
    pre = spec.get("pre_tokenizer") or {}
    fields = [Field("tokenizer.ggml.model", "gpt2", T.STRING),
              Field("tokenizer.ggml.pre", "gpt-2" if pre.get("type") == "ByteLevel"
                    and pre.get("use_regex", True) else "default", T.STRING),
              Field("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
              Field("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32),
              Field("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING)]
    for key, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                       ("unknown", tokenizer.unk_token_id), ("padding", tokenizer.pad_token_id)):
        if value is not None:
            fields.append(Field(f"tokenizer.ggml.{key}_token_id", int(value), T.UINT32))
    if getattr(tokenizer, "add_bos_token", None) is not None:
        fields.append(Field("tokenizer.ggml.add_bos_token", bool(tokenizer.add_bos_token),
                            T.BOOL))
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        fields.append(Field("tokenizer.chat_template", tokenizer.chat_template, T.STRING))
    return fields


def _byte_level(pre: dict | None) -> bool:
    if not pre:
        return False
    if pre.get("type") == "ByteLevel":
        return True
    return pre.get("type") == "Sequence" and any(
        p.get("type") == "ByteLevel" for p in pre.get("pretokenizers") or ())


def hf_tensors(loaded: LoadedModel) -> list[tuple[str, np.ndarray | None]]:
    """Every tensor of the model by GGUF name, in the state dict's order: the plan's entries
    as placeholders (None; the export writes them), norms and biases as float32."""
    planned = {f"{info.name}.weight" for info in loaded.layers + loaded.tables}
    config = loaded.config
    heads = (config.num_attention_heads,
             getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out: list[tuple[str, np.ndarray | None]] = []
    for name, tensor in loaded.model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue  # llama.cpp reads token_embd for a missing output
        try:
            gguf = gguf_name(name)
        except KeyError:
            raise AutocompressError(f"{loaded.spec!r} has a tensor {name!r} that a llama GGUF "
                                    f"has no place for: convert it with {CONVERTER}") from None
        if name in planned:
            out.append((gguf, None))
        else:  # a q/k bias is reordered like its weight's rows
            values = tensor.detach().float().cpu().numpy().astype(np.float32)
            out.append((gguf, np.ascontiguousarray(to_gguf_rows(name, values, *heads))))
    return out
