"""The GGUF a model was loaded from, read as llama-quantize reads it.

llama-quantize copies a tensor that is already in its target type instead of quantizing it
again ("quantize = tensor->type != new_type" in llama-quant.cpp): llama.cpp's k-quant
quantizers search their scales, so quantizing a q4_k tensor's decoded values to q4_k does not
give its bytes back, and every such second rounding costs accuracy. When a plan gives a layer
the type its source GGUF stores it in, the build keeps the stored bytes the same way (and the
torch engine computes with their decoded values, which are the loaded weights themselves).
Plans record whether they were built so (``Provenance.gguf_source_copy``).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from .compress.gguf import GGUFWeight
from .gguf_types import GGUF_BY_GGML
from .model import ALIASES, LoadedModel, resolve_alias

# llama.cpp's converter reorders q and k rows for this architecture (gguf_layout.py)
PERMUTED_ARCH = "llama"


def gguf_path(loaded: LoadedModel) -> Path | None:
    """The GGUF file ``loaded`` was read from, or None (a Hugging Face directory)."""
    spec = loaded.spec
    if spec in ALIASES:
        return resolve_alias(spec)
    if spec.endswith(".gguf") and Path(spec).is_file():
        return Path(spec)
    return None


def read_gguf(path: Path):
    """gguf-py's reader of ``path``, kept for the process: it parses every metadata field up
    front (~10 s for a 49k-token vocabulary), and a benchmark or a search reads the same source
    many times. Keyed by size and modification time, so a file replaced on disk is read again."""
    stat = Path(path).stat()
    return _cached_reader(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, size: int, mtime_ns: int):
    from gguf import GGUFReader

    return GGUFReader(path)


class SourceTensors:
    """The stored bytes of a GGUF's weight matrices, by Hugging Face layer name, in Hugging
    Face row order (GGUF blocks run along rows, so reordering rows keeps every block)."""

    def __init__(self, path: Path, n_head: int, n_head_kv: int):
        self.path = path
        self._heads = (n_head, n_head_kv)
        self._arch: str | None = None
        self._tensors: dict | None = None  # read on the first ``stored``: most plans have
        self._stored: dict[str, GGUFWeight | None] = {}  # no GGUF layer (~150 MB, 3 s)

    def _open(self) -> None:
        reader = read_gguf(self.path)
        self._arch = reader.fields["general.architecture"].contents()
        self._tensors = {t.name: t for t in reader.tensors}

    def stored(self, layer_name: str) -> GGUFWeight | None:
        """The GGUF weight ``layer_name`` (``model.layers.3.mlp.down_proj``) was loaded from;
        None where the file holds no such matrix or holds it in a type plans do not take."""
        if layer_name not in self._stored:
            self._stored[layer_name] = self._read(layer_name)
        return self._stored[layer_name]

    def _read(self, layer_name: str) -> GGUFWeight | None:
        from .export.gguf_layout import from_gguf_rows, gguf_name

        if self._tensors is None:
            self._open()
        hf = f"{layer_name}.weight"
        try:
            tensor = self._tensors.get(gguf_name(hf))
        except KeyError:
            return None
        if tensor is None or len(tensor.shape) != 2:
            return None
        gtype = GGUF_BY_GGML.get(int(tensor.tensor_type))
        if gtype is None:
            return None
        n, rows = (int(d) for d in tensor.shape)  # GGUF lists the row length first
        data = np.asarray(tensor.data)
        if gtype.is_float:
            data = data.view(np.uint8)
        data = data.reshape(rows, -1)
        if self._arch == PERMUTED_ARCH:
            data = from_gguf_rows(hf, data, *self._heads)
        return GGUFWeight(gtype, np.ascontiguousarray(data), (rows, n))


def source_tensors(loaded: LoadedModel) -> SourceTensors | None:
    """The source GGUF's tensors of ``loaded``, or None when it was not loaded from a GGUF;
    one per model and file, so the rows reordered for one build serve the next."""
    path = gguf_path(loaded)
    if path is None:
        return None
    config = loaded.config
    heads = config.num_attention_heads
    stat = path.stat()
    return _tensors_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns, heads,
                       getattr(config, "num_key_value_heads", None) or heads)


@functools.lru_cache(maxsize=2)
def _tensors_of(path: str, _size: int, _mtime_ns: int, n_head: int, n_head_kv: int
                ) -> SourceTensors:
    # keyed by size and modification time too, so a file replaced on disk gets new tensors
    return SourceTensors(Path(path), n_head, n_head_kv)
