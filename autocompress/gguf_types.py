"""GGUF tensor types as data: ggml's enum value and block layout of each type a plan may name,
and llama.cpp's fallback when a row is not a multiple of a type's block.

Pure data (no torch, no library), so plans, byte accounting and the llama.cpp binding share
one table; the binding checks it against the loaded library's ``ggml_blck_size`` and
``ggml_type_size`` (engines/llamacpp.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GGUFType:
    """A GGUF tensor type: ggml's enum value, weights per block, bytes per block."""

    name: str
    ggml: int
    block: int
    block_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block

    @property
    def is_float(self) -> bool:
        return self.block == 1

    def row_bytes(self, n: int) -> int:
        if n % self.block:
            raise ValueError(f"{self.name} needs rows that are a multiple of {self.block}, got {n}")
        return n // self.block * self.block_bytes


# ggml-common.h's layouts
GGUF_TYPES = {t.name: t for t in (
    GGUFType("f32", 0, 1, 4), GGUFType("f16", 1, 1, 2), GGUFType("bf16", 30, 1, 2),
    GGUFType("q8_0", 8, 32, 34), GGUFType("q6_k", 14, 256, 210), GGUFType("q5_k", 13, 256, 176),
    GGUFType("q5_1", 7, 32, 24), GGUFType("q5_0", 6, 32, 22), GGUFType("q4_k", 12, 256, 144),
    GGUFType("q4_1", 3, 32, 20), GGUFType("q4_0", 2, 32, 18), GGUFType("iq4_nl", 20, 32, 18),
    GGUFType("iq4_xs", 23, 256, 136), GGUFType("q3_k", 11, 256, 110),
    GGUFType("q2_k", 10, 256, 84),
)}
GGUF_BY_GGML = {t.ggml: t for t in GGUF_TYPES.values()}

# what llama.cpp's quantizer uses when a row is not a multiple of the type's block
# (llama-quant.cpp, after choosing a tensor's type)
_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0",
             "iq4_xs": "iq4_nl"}


def gguf_type(name: str) -> GGUFType:
    """The type called ``name`` (any case: ``Q4_K`` or ``q4_k``); KeyError names the choices."""
    try:
        return GGUF_TYPES[name.lower()]
    except (KeyError, AttributeError):
        raise KeyError(f"unknown GGUF type {name!r}: choose from {', '.join(GGUF_TYPES)}") \
            from None


def type_for_row(name: str, n_per_row: int) -> GGUFType:
    """The type a tensor of rows ``n_per_row`` long really gets: ``name``, or llama.cpp's
    fallback (then float16 if not even a multiple of 32)."""
    wanted = gguf_type(name)
    if n_per_row % wanted.block == 0:
        return wanted
    fallback = GGUF_TYPES[_FALLBACK.get(wanted.name, "f16")]
    return fallback if n_per_row % fallback.block == 0 else GGUF_TYPES["f16"]


def matrix_bytes(name: str, rows: int, n_per_row: int) -> int:
    """Exact bytes of a [rows, n_per_row] tensor stored as ``name`` (after the fallback)."""
    return rows * type_for_row(name, n_per_row).row_bytes(n_per_row)


def fallback_notes(entries) -> list[str]:
    """One line per (wanted, stored) type pair that llama.cpp's fallback changes, for
    ``entries`` of (name, gguf type, rows, n_per_row): users should know that q4_k on rows of
    576 is stored as q5_0."""
    changed: dict[tuple[str, str], list[str]] = {}
    for name, wanted, _rows, n in entries:
        stored = type_for_row(wanted, n).name
        if stored != wanted:
            changed.setdefault((wanted, stored), []).append(name)
    return [f"{len(names)} tensor(s) asked for {wanted} have rows not a multiple of its block "
            f"({gguf_type(wanted).block}): llama.cpp stores them as {stored} (e.g. {names[0]})"
            for (wanted, stored), names in changed.items()]
