"""llama.cpp through its C API, by ctypes: run a GGUF file, and quantize matrices with
llama.cpp's own quantizer.

The library is the prebuilt CPU llama.cpp of the ``xllamacpp`` wheel, pinned
(``pip install xllamacpp==2026.10.11549``: no compiler needed), or any libllama named by
``AUTOCOMPRESS_LLAMA_LIB=/path/to/libllama.so`` (a CUDA build on a Jetson). Struct layouts
change between llama.cpp versions, and a wrong layout does not fail cleanly (the process
aborts, or computes on garbage), so the library is checked at load against what was measured
on the pinned build: the defaults of ``llama_context_params`` and the block layouts of the GGUF
types. A library that differs is refused with one line.

Only the leading fields of ``llama_context_params`` are touched (context, batch sizes, the two
output-count fields, threads); the struct travels as an opaque buffer larger than any version's,
which is safe for the two functions that take it by value as their last argument.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import struct
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import AutocompressError
from ..gguf_types import GGUF_TYPES, GGUFType, type_for_row  # noqa: F401 (re-exported)
from .base import Engine

PINNED_WHEEL = "xllamacpp"
PINNED_VERSION = "2026.10.11549"
INSTALL = f"pip install {PINNED_WHEEL}=={PINNED_VERSION}"
LIBRARY_ENV = "AUTOCOMPRESS_LLAMA_LIB"

# llama_context_default_params() of the pinned build, as nine uint32: n_ctx, n_batch, n_ubatch,
# n_seq_max, the two output-count fields (0: "as many as the batch asks"; they must be raised
# to the window length, or asking for every position's logits aborts the process), one more,
# n_threads, n_threads_batch.
CONTEXT_DEFAULTS = (512, 2048, 512, 1, 0, 0, 1, 4, 4)
_N_CTX, _N_BATCH, _N_UBATCH, _OUT_A, _OUT_B, _THREADS, _THREADS_BATCH = 0, 4, 8, 16, 20, 28, 32
_PARAMS_BYTES = 1024  # larger than any version's struct (the pinned one is under 200 bytes)


# -- the library ---------------------------------------------------------------------------------

class _Params(ctypes.Structure):
    _fields_ = [("raw", ctypes.c_uint8 * _PARAMS_BYTES)]


class _Batch(ctypes.Structure):  # llama_batch: unchanged across llama.cpp versions since 2023
    _fields_ = [("n_tokens", ctypes.c_int32), ("token", ctypes.POINTER(ctypes.c_int32)),
                ("embd", ctypes.POINTER(ctypes.c_float)), ("pos", ctypes.POINTER(ctypes.c_int32)),
                ("n_seq_id", ctypes.POINTER(ctypes.c_int32)),
                ("seq_id", ctypes.POINTER(ctypes.POINTER(ctypes.c_int32))),
                ("logits", ctypes.POINTER(ctypes.c_int8))]


_SIGNATURES = {
    "llama_backend_init": (None, []),
    "llama_log_set": (None, [ctypes.c_void_p, ctypes.c_void_p]),
    "llama_model_default_params": (_Params, []),
    "llama_context_default_params": (_Params, []),
    "llama_model_load_from_file": (ctypes.c_void_p, [ctypes.c_char_p, _Params]),
    "llama_model_free": (None, [ctypes.c_void_p]),
    "llama_init_from_model": (ctypes.c_void_p, [ctypes.c_void_p, _Params]),
    "llama_free": (None, [ctypes.c_void_p]),
    "llama_model_get_vocab": (ctypes.c_void_p, [ctypes.c_void_p]),
    "llama_vocab_n_tokens": (ctypes.c_int32, [ctypes.c_void_p]),
    "llama_batch_init": (_Batch, [ctypes.c_int32, ctypes.c_int32, ctypes.c_int32]),
    "llama_batch_free": (None, [_Batch]),
    "llama_decode": (ctypes.c_int32, [ctypes.c_void_p, _Batch]),
    "llama_get_logits": (ctypes.POINTER(ctypes.c_float), [ctypes.c_void_p]),
    "llama_get_memory": (ctypes.c_void_p, [ctypes.c_void_p]),
    "llama_memory_clear": (None, [ctypes.c_void_p, ctypes.c_bool]),
    "ggml_blck_size": (ctypes.c_int64, [ctypes.c_int]),
    "ggml_type_size": (ctypes.c_size_t, [ctypes.c_int]),
    "ggml_quantize_requires_imatrix": (ctypes.c_bool, [ctypes.c_int]),
    "ggml_quantize_chunk": (ctypes.c_size_t, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                              ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                              ctypes.c_void_p]),
}

_LIBRARY: dict = {}
_LOG_SINK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)(
    lambda level, text, data: None)  # llama.cpp's own log lines would bury ours


def library_path() -> Path:
    """The libllama to use: ``AUTOCOMPRESS_LLAMA_LIB``, else the pinned xllamacpp wheel's."""
    given = os.environ.get(LIBRARY_ENV)
    if given:
        if not Path(given).is_file():
            raise AutocompressError(f"{LIBRARY_ENV}={given!r}: no such file; point it at a "
                                    f"libllama.so, or unset it to use {INSTALL}")
        return Path(given)
    try:
        version = importlib.metadata.version(PINNED_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise AutocompressError(f"llama.cpp is not installed: {INSTALL} (a prebuilt CPU build), "
                                f"or set {LIBRARY_ENV} to your own libllama.so") from None
    if version != PINNED_VERSION:
        raise AutocompressError(f"{PINNED_WHEEL} {version} is installed; autocompress's binding "
                                f"is checked against {PINNED_VERSION}: {INSTALL}")
    for file in importlib.metadata.files(PINNED_WHEEL) or []:
        if file.name.startswith("xllamacpp") and file.name.endswith(".so"):
            return Path(file.locate())
    raise AutocompressError(f"{PINNED_WHEEL} {version} has no shared library; reinstall: "
                            f"{INSTALL}")


def library() -> ctypes.CDLL:
    """The loaded, checked library (loaded once per process)."""
    path = library_path()
    if _LIBRARY.get("path") == path:
        return _LIBRARY["lib"]
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise AutocompressError(f"cannot load llama.cpp from {path}: {exc}") from None
    missing = [name for name in _SIGNATURES if not hasattr(lib, name)]
    if missing:
        raise AutocompressError(f"{path} is not a llama.cpp library this binding knows (it lacks "
                                f"{', '.join(missing[:3])}); {INSTALL}")
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    check_layout(lib, path)
    lib.llama_log_set(ctypes.cast(_LOG_SINK, ctypes.c_void_p), None)
    lib.llama_backend_init()
    _LIBRARY.update(path=path, lib=lib)
    return lib


def check_layout(lib, path: Path, expected: tuple[int, ...] = CONTEXT_DEFAULTS) -> None:
    """Refuse a library whose structs or GGUF block layouts differ from the pinned build's."""
    raw = bytes(lib.llama_context_default_params().raw)
    found = struct.unpack_from(f"<{len(expected)}I", raw)
    if found != expected:
        raise AutocompressError(
            f"{path}: llama_context_params differs from the llama.cpp this binding was checked "
            f"against (defaults read {found}, expected {expected}); use {INSTALL}, or a build "
            "of the same llama.cpp version")
    for t in GGUF_TYPES.values():
        block, size = lib.ggml_blck_size(t.ggml), lib.ggml_type_size(t.ggml)
        if (block, size) != (t.block, t.block_bytes):
            raise AutocompressError(
                f"{path}: GGUF type {t.name} has block {block} x {size} bytes there, "
                f"{t.block} x {t.block_bytes} in this binding; {INSTALL}")


# -- quantizing ----------------------------------------------------------------------------------

def quantize(matrix: np.ndarray, type_name: str, imatrix: np.ndarray | None = None
             ) -> np.ndarray:
    """``matrix`` [rows, n] quantized by llama.cpp (``ggml_quantize_chunk``) to ``type_name``,
    each weight's rounding error weighted by ``imatrix`` [n] (llama.cpp's importance: mean x²
    of each input column) where given. Returns the GGUF bytes [rows, row bytes]."""
    if type_name not in GGUF_TYPES:
        raise AutocompressError(f"unknown GGUF type {type_name!r}: choose from "
                                f"{', '.join(GGUF_TYPES)}")
    t = GGUF_TYPES[type_name]
    src = np.ascontiguousarray(matrix, dtype=np.float32)
    rows, n = src.shape
    row_bytes = t.row_bytes(n)
    if t.name in ("f32", "f16", "bf16"):
        return _float_bytes(src, t.name).reshape(rows, row_bytes)
    lib = library()
    weights = None
    if imatrix is not None:
        weights = np.ascontiguousarray(imatrix, dtype=np.float32)
        if weights.shape != (n,):
            raise ValueError(f"imatrix must have one entry per input column ({n}), got "
                             f"{weights.shape}")
    elif lib.ggml_quantize_requires_imatrix(t.ggml):
        raise AutocompressError(f"GGUF type {t.name} needs an importance matrix (imatrix)")
    out = np.empty((rows, row_bytes), dtype=np.uint8)
    written = lib.ggml_quantize_chunk(t.ggml, src.ctypes.data, out.ctypes.data, 0, rows, n,
                                      None if weights is None else weights.ctypes.data)
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out


def _float_bytes(src: np.ndarray, name: str) -> np.ndarray:
    if name == "f32":
        return src.view(np.uint8)
    if name == "f16":
        return src.astype(np.float16).view(np.uint8)
    as_int = torch.from_numpy(src).to(torch.bfloat16).view(torch.int16).numpy()
    return as_int.view(np.uint8)


def dequantize(data: np.ndarray, type_name: str, shape: tuple[int, int]) -> np.ndarray:
    """GGUF bytes back to float32 [rows, n]: llama.cpp's own ``dequantize_row_*`` (C, about a
    hundred times faster than gguf-py's numpy code on K-types), else gguf-py's where the
    library lacks the symbol or is not installed."""
    t = GGUF_TYPES[type_name]
    src = np.ascontiguousarray(data, dtype=np.uint8)
    if src.nbytes != t.row_bytes(shape[1]) * shape[0]:  # the C call would read past the end
        raise ValueError(f"{src.nbytes} bytes are not a {shape} matrix of {t.name}")
    if t.name in ("f32", "f16", "bf16"):
        return _float_values(src, t.name).reshape(shape)
    row = _dequantize_row(t.name)
    if row is None:
        return _dequantize_numpy(src, t.name, shape)
    out = np.empty(shape, dtype=np.float32)
    row(src.ctypes.data, out.ctypes.data, out.size)  # the rows are contiguous blocks
    return out


def _dequantize_row(name: str):
    """llama.cpp's ``dequantize_row_<type>(blocks, floats, count)`` (ggml-quants.h), or None."""
    try:
        lib = library()
    except AutocompressError:
        return None
    symbol = "dequantize_row_" + name.replace("_k", "_K")
    fn = getattr(lib, symbol, None)
    if fn is not None:
        fn.restype, fn.argtypes = None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return fn


def _dequantize_numpy(src: np.ndarray, name: str, shape: tuple[int, int]) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    values = gguf_dequantize(src.reshape(shape[0], -1),
                             GGMLQuantizationType(GGUF_TYPES[name].ggml))
    return np.asarray(values, dtype=np.float32).reshape(shape)


def _float_values(src: np.ndarray, name: str) -> np.ndarray:
    if name == "f32":
        return src.view(np.float32).copy()
    if name == "f16":
        return src.view(np.float16).astype(np.float32)
    as_bf16 = torch.from_numpy(src.view(np.int16).copy()).view(torch.bfloat16)
    return as_bf16.float().numpy()


# -- running a GGUF --------------------------------------------------------------------------------

class LlamaCppEngine(Engine):
    """A GGUF file loaded in llama.cpp; logits of every position of a window in one decode."""

    name = "llamacpp"

    def __init__(self, gguf_path: str | Path, n_ctx: int = 512, threads: int | None = None):
        from ..model import check_gguf

        path = Path(gguf_path)
        if not path.is_file():
            raise AutocompressError(f"GGUF file {str(path)!r} not found")
        self.lib = lib = library()
        self.n_ctx = n_ctx
        self.model = lib.llama_model_load_from_file(str(path).encode(),
                                                    lib.llama_model_default_params())
        if not self.model:
            # llama.cpp refuses a damaged file without saying why through the C API; gguf-py's
            # reader names it (run only now: it parses every metadata field, ~10 s on a file
            # with a 49k-token vocabulary, while llama.cpp loads in under a second)
            check_gguf(path)
            raise AutocompressError(f"llama.cpp could not load {str(path)!r} (an architecture or "
                                    "tensor type this build does not know?)")
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        params = lib.llama_context_default_params()
        threads = threads or max(1, torch.get_num_threads())
        for offset, value in ((_N_CTX, n_ctx), (_N_BATCH, n_ctx), (_N_UBATCH, n_ctx),
                              (_OUT_A, n_ctx), (_OUT_B, n_ctx), (_THREADS, threads),
                              (_THREADS_BATCH, threads)):
            struct.pack_into("<I", params.raw, offset, value)
        self.ctx = lib.llama_init_from_model(self.model, params)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise AutocompressError(f"llama.cpp could not make a context of {n_ctx} tokens for "
                                    f"{str(path)!r}")
        self.batch = lib.llama_batch_init(n_ctx, 0, 1)
        self._tokens = np.ctypeslib.as_array(self.batch.token, shape=(n_ctx,))
        self._pos = np.ctypeslib.as_array(self.batch.pos, shape=(n_ctx,))
        np.ctypeslib.as_array(self.batch.n_seq_id, shape=(n_ctx,))[:] = 1
        np.ctypeslib.as_array(self.batch.logits, shape=(n_ctx,))[:] = 1  # every position
        for i in range(n_ctx):  # one sequence (id 0) for every slot, set once
            self.batch.seq_id[i][0] = 0

    def window_logits(self, window: torch.Tensor) -> torch.Tensor:
        n = int(window.numel())
        if n > self.n_ctx:
            raise AutocompressError(f"a window of {n} tokens is longer than the llama.cpp "
                                    f"context ({self.n_ctx})")
        ids = window.detach().cpu().numpy().astype(np.int32)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_vocab):
            raise AutocompressError("token ids outside the GGUF's vocabulary: the windows were "
                                    "made with another tokenizer")
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        self._tokens[:n] = ids
        self._pos[:n] = np.arange(n, dtype=np.int32)
        self.batch.n_tokens = n
        status = self.lib.llama_decode(self.ctx, self.batch)
        if status != 0:
            raise AutocompressError(f"llama_decode failed (status {status})")
        logits = np.ctypeslib.as_array(self.lib.llama_get_logits(self.ctx),
                                       shape=(n, self.n_vocab))
        return torch.from_numpy(logits.copy())

    def decode_tokens_per_s(self, n_tokens: int = 64, prompt: int = 16, token: int = 1) -> float:
        """Decode speed at batch 1: ``prompt`` tokens prefilled, then ``n_tokens`` decoded one
        per llama_decode (the logits of each computed, as generation needs them); the ids fed
        do not change the work, so no sampling is done."""
        if prompt + n_tokens > self.n_ctx:
            raise AutocompressError(f"{prompt} + {n_tokens} tokens exceed the llama.cpp "
                                    f"context ({self.n_ctx})")
        lib = self.lib
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        self._tokens[:prompt] = token
        self._pos[:prompt] = np.arange(prompt, dtype=np.int32)
        self.batch.n_tokens = prompt
        if lib.llama_decode(self.ctx, self.batch) != 0:
            raise AutocompressError("llama_decode failed on the prompt")
        self.batch.n_tokens = 1
        start = time.perf_counter()
        for i in range(n_tokens):
            self._pos[0] = prompt + i
            if lib.llama_decode(self.ctx, self.batch) != 0:
                raise AutocompressError("llama_decode failed while decoding")
            lib.llama_get_logits(self.ctx)[0]  # the logits are read, as a generator would
        return n_tokens / (time.perf_counter() - start)

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone
            pass
