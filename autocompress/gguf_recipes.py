"""llama.cpp's own recipes (Q4_K_M, Q3_K_S, ...): the type llama-quantize gives each tensor.

One readable function of the tensor's name, its place and the recipe, as ``llama_tensor_get_type``
in llama.cpp's src/llama-quant.cpp decides it for dense (non-MoE, non-Falcon) models. Two
details decide which blocks get the larger types and are easy to get wrong:

- the attn_v and ffn_down counters run over the tensors in llama.cpp's order, which is sorted by
  name (blk.0, blk.1, blk.10, ..., blk.19, blk.2, ...), not by block number;
- a tied embedding (no output.weight) is quantized by the output head's rule.

After the rule, a row that is not a whole number of the type's blocks gets llama.cpp's fallback
type (gguf_types.type_for_row). Checked against the tensor table of a Q4_K_M file that
llama-quantize made (tests/test_gguf_recipes.py). Not modelled: the IQ1/IQ2/IQ3 recipes (their
types are not in gguf_types), mixture-of-experts and Falcon rules, and the 70B rule that
widens attn_v of 70B Llamas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .errors import AutocompressError
from .gguf_types import GGUF_TYPES, type_for_row

# recipe -> the type of every tensor the rules do not change (llama_ftype_get_default_type)
RECIPES = {
    "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0", "Q6_K": "q6_k",
    "Q5_K_M": "q5_k", "Q5_K_S": "q5_k", "Q5_1": "q5_1", "Q5_0": "q5_0",
    "Q4_K_M": "q4_k", "Q4_K_S": "q4_k", "Q4_1": "q4_1", "Q4_0": "q4_0",
    "IQ4_NL": "iq4_nl", "IQ4_XS": "iq4_xs",
    "Q3_K_L": "q3_k", "Q3_K_M": "q3_k", "Q3_K_S": "q3_k", "Q2_K": "q2_k",
}


@dataclass(frozen=True)
class Model:
    """What the rules read about the model besides tensor names."""

    n_layer: int
    n_head: int
    n_head_kv: int
    tied_embeddings: bool  # no output.weight: token_embd serves as the head

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's boost: the first and last eighth, and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for part in ("attn_v.weight", "attn_k.weight", "attn_q.weight", "attn_output.weight"):
        if part in name:
            return part.split(".")[0]
    for part in ("ffn_up", "ffn_gate", "ffn_down"):
        if part in name:
            return part
    return "other"


def quantizable(name: str, shape: list[int] | tuple[int, ...]) -> bool:
    """llama.cpp quantizes 2-D weights but not norms (1-D tensors, biases stay as they are)."""
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


def recipe_types(recipe: str, tensors: Iterable[tuple[str, int]], model: Model,
                 imatrix: bool = False, pure: bool = False) -> dict[str, str]:
    """GGUF type of each quantizable tensor, given as (GGUF name, row length), under ``recipe``
    (with an importance matrix, or ``pure``: the default type everywhere, as
    ``llama-quantize --pure``), after llama.cpp's fallback for row lengths."""
    if recipe not in RECIPES:
        raise AutocompressError(f"unknown llama.cpp recipe {recipe!r}: choose from "
                                f"{', '.join(RECIPES)}")
    default = RECIPES[recipe]
    tensors = dict(tensors)
    n_attn_v = sum(category(name) == "attn_v" for name in tensors)
    counters = {"attn_v": 0, "ffn_down": 0}
    out = {}
    for name in sorted(tensors):  # llama.cpp's tensor map is ordered by name
        kind = category(name)
        if GGUF_TYPES[default].is_float:
            out[name] = default
            continue
        chosen = default if pure else _rule(recipe, default, kind, tensors[name], model, imatrix,
                                            counters, n_attn_v)
        if kind in counters:
            counters[kind] += 1
        out[name] = type_for_row(chosen, tensors[name]).name
    return out


def _rule(recipe: str, default: str, kind: str, row: int, model: Model, imatrix: bool,
          counters: dict[str, int], n_attn_v: int) -> str:
    """llama_tensor_get_type_impl for the recipes in RECIPES."""
    if kind == "output" or (kind == "token_embd" and model.tied_embeddings):
        if row % GGUF_TYPES[default].block:
            return "q8_0"
        return default if default == "q8_0" else "q6_k"
    if kind == "attn_v":
        i = counters["attn_v"]
        if recipe == "Q2_K":
            return "q4_k" if model.n_gqa >= 4 else "q3_k"
        if recipe == "Q3_K_M":
            return "q5_k" if i < 2 else "q4_k"
        if recipe == "Q3_K_L":
            return "q5_k"
        if recipe in ("IQ4_NL", "IQ4_XS") and model.n_gqa >= 4:
            return "q5_k"
        if recipe in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n_attn_v):
            return "q6_k"
        if recipe == "Q4_K_S" and i < 4:
            return "q5_k"
        return default
    if kind == "ffn_down":
        i, n = counters["ffn_down"], model.n_layer
        if recipe == "Q2_K":
            return "q3_k"
        if recipe == "Q3_K_M":
            return "q5_k" if i < n // 16 else "q4_k"
        if recipe == "Q3_K_L":
            return "q5_k"
        if recipe == "Q4_K_M":
            return "q6_k" if use_more_bits(i, n) else default
        if i < n // 8 and recipe in ("IQ4_NL", "IQ4_XS") and not imatrix:
            return "q5_k"
        if recipe == "Q5_K_M" and use_more_bits(i, n):
            return "q6_k"
        if recipe == "Q4_K_S" and i < n // 8:
            return "q5_k"
        if recipe in ("Q4_0", "Q5_0") and imatrix and i < n // 8:
            return "q4_1" if recipe == "Q4_0" else "q5_1"
        return default
    if kind == "attn_output":
        return {"Q2_K": "q3_k", "Q3_K_M": "q4_k", "Q3_K_L": "q5_k"}.get(recipe, default)
    return default


def recipe_configs(loaded, recipe: str, imatrix: bool = False, pure: bool = False) -> dict:
    """The recipe as plan entries: a LayerConfig per block linear of ``loaded`` (a
    model.LoadedModel) and for its embedding and untied head, keyed by their Hugging Face
    names. With ``imatrix`` the block linears use ``method: imatrix`` (llama.cpp has no
    importance for the embedding's lookups; an untied head is weighted in llama.cpp, not here)."""
    from .export.gguf_layout import gguf_name
    from .plan import LayerConfig

    config = loaded.config
    heads = config.num_attention_heads
    tables = loaded.tables
    model = Model(n_layer=config.num_hidden_layers, n_head=heads,
                  n_head_kv=getattr(config, "num_key_value_heads", None) or heads,
                  tied_embeddings=len(tables) == 1)
    by_gguf = {gguf_name(f"{info.name}.weight"): info for info in loaded.layers + tables}
    types = recipe_types(recipe, ((name, info.in_features) for name, info in by_gguf.items()),
                         model, imatrix, pure)
    table_names = {info.name for info in tables}
    out = {}
    for name, type_name in types.items():
        info = by_gguf[name]
        weighted = imatrix and info.name not in table_names
        out[info.name] = LayerConfig(gguf=type_name, method="imatrix" if weighted else "rtn")
    return out


def recipe_plan(loaded, recipe: str, imatrix: bool = False, pure: bool = False,
                provenance=None):
    """The recipe as a plan: its default type as the default, the rules' other types as
    overrides, the embedding (and an untied head) as their entries."""
    from .plan import LayerConfig, Plan, compact_overrides
    from .provenance import Provenance

    if recipe.upper() not in RECIPES:
        raise AutocompressError(f"unknown llama.cpp recipe {recipe!r}: choose from "
                                f"{', '.join(RECIPES)}")
    recipe = recipe.upper()
    configs = recipe_configs(loaded, recipe, imatrix=imatrix, pure=pure)
    tables = {table.name for table in loaded.tables}
    default = LayerConfig(gguf=RECIPES[recipe], method="imatrix" if imatrix else "rtn")
    overrides = compact_overrides({n: c for n, c in configs.items() if n not in tables},
                                  default)
    overrides.update(compact_overrides({n: configs[n] for n in tables
                                        if not configs[n].is_identity}, LayerConfig()))
    label = f"llama.cpp {recipe}" + (" pure" if pure else "") + (" imatrix" if imatrix else "")
    return Plan(model=loaded.identity, default=default, overrides=overrides,
                figures={"kind": "recipe", "label": label},
                provenance=provenance or Provenance())
