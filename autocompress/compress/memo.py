"""Expensive per-(layer, config) results kept across the plans a search builds.

Level 2 builds hundreds of plans from the same calibration statistics (parallel mode), so a
layer's GPTQ codes, low-rank factors or llama.cpp blocks for one config are the same in every
plan that gives the layer that config: computed once, kept here. A memo keeps the stored codes,
not their float32 decoding (1 byte a weight instead of 4), in memory up to ``max_bytes`` (least
recently used first out), and, given a ``directory``, every entry on disk as well: a dropped
entry is read back instead of computed again, and level 2's Ray workers, each with its own
memo on the same directory, reuse what any of them computed (a worker's GPTQ codes are the
other's bit for bit: the same statistics, settings and thread count).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load, save

from ..gguf_types import gguf_type
from ..io_utils import atomic_write_bytes
from .gguf import GGUFWeight
from .quant import QuantizedWeight
from .weights import CompressedLayer


def worth_keeping(cfg) -> bool:
    """The configs whose results a memo keeps: the expensive ones (SVD, GPTQ, llama.cpp's
    k-quant search); plain rounding is cheaper to redo than to read back."""
    return cfg.is_low_rank or cfg.method == "gptq" or cfg.is_gguf


def memo_dir(stats_dir: Path, gptq) -> Path:
    """Where the memo of plans built from the statistics in ``stats_dir`` with GPTQ settings
    ``gptq`` lives: beside the statistics (emptied with them when their key changes). Each
    entry is computed once per search, by whoever needs it first (the sensitivity table, which
    computes every expensive option's real error anyway, or a level-2 meter), and read by
    every plan after: a study's trials do not depend on which process or thread count
    computed it."""
    import dataclasses

    digest = hashlib.sha256(json.dumps(dataclasses.asdict(gptq), sort_keys=True)
                            .encode()).hexdigest()[:12]
    return Path(stats_dir) / "memo" / digest


def for_memo(compressed: CompressedLayer) -> CompressedLayer:
    """What a memo keeps of a layer: the stored codes, not their float32 decoding (4 bytes a
    weight, against 1 for codes or less for GGUF blocks); a memo holds many configs per layer."""
    return CompressedLayer([f if q is None else None
                            for f, q in zip(compressed.factors, compressed.quantized)],
                           compressed.masks, compressed.quantized)


def from_memo(kept: CompressedLayer) -> CompressedLayer:
    """The layer again: every factor was its codes' dequantization, so this is exact."""
    if all(f is not None for f in kept.factors):
        return kept
    return CompressedLayer([q.dequantize() if f is None else f
                            for f, q in zip(kept.factors, kept.quantized)],
                           kept.masks, kept.quantized)


class LayerMemo:
    """(layer name, LayerConfig) -> what ``for_memo`` keeps, at most ``max_bytes`` of it in
    memory; with ``directory`` every entry is also written there and read back on a miss."""

    def __init__(self, max_bytes: int, directory: str | Path | None = None):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.directory = None if directory is None else Path(directory)
        self._entries: OrderedDict[tuple, tuple[CompressedLayer, int]] = OrderedDict()

    def _path(self, key) -> Path:
        name, cfg = key
        digest = hashlib.sha256(json.dumps([name, cfg.to_dict()], sort_keys=True)
                                .encode()).hexdigest()[:24]
        return self.directory / f"{digest}.safetensors"

    def __contains__(self, key) -> bool:
        return key in self._entries or (self.directory is not None
                                        and self._path(key).is_file())

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, key) -> CompressedLayer:
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key][0]
        if self.directory is None:
            raise KeyError(key)
        try:
            kept = _from_bytes(self._path(key).read_bytes())
        except FileNotFoundError:
            raise KeyError(key) from None
        self._keep(key, kept)
        return kept

    def __setitem__(self, key, kept: CompressedLayer) -> None:
        if self.directory is not None and not self._path(key).is_file():
            atomic_write_bytes(self._path(key), _to_bytes(kept))
        self._keep(key, kept)

    def _keep(self, key, kept: CompressedLayer) -> None:
        size = _kept_bytes(kept)
        if key in self._entries:
            self.nbytes -= self._entries.pop(key)[1]
        self._entries[key] = (kept, size)
        self.nbytes += size
        while self.nbytes > self.max_bytes and len(self._entries) > 1:
            _, (_, freed) = self._entries.popitem(last=False)
            self.nbytes -= freed

    def values(self):
        return [kept for kept, _ in self._entries.values()]


def _kept_bytes(kept: CompressedLayer) -> int:
    return sum(t.numel() * t.element_size() for t in layer_tensors(kept)[0].values())


def layer_tensors(kept: CompressedLayer, prefix: str = ""
                  ) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """A compressed layer as named tensors (names start with ``prefix``, so several layers can
    share one file) and, per factor, what kind of storage it has."""
    tensors: dict[str, torch.Tensor] = {}
    parts: list[dict] = []
    for n, (factor, mask, stored) in enumerate(zip(kept.factors, kept.masks, kept.quantized)):
        i = f"{prefix}{n}"
        if factor is not None:
            tensors[f"{i}.factor"] = factor
        if mask is not None:
            tensors[f"{i}.mask"] = mask
        if isinstance(stored, QuantizedWeight):
            tensors.update({f"{i}.q": stored.q, f"{i}.scale": stored.scale,
                            f"{i}.zero": stored.zero})
            if stored.input_scale is not None:
                tensors[f"{i}.input_scale"] = stored.input_scale
            parts.append({"kind": "rtn", "bits": stored.bits, "group_size": stored.group_size,
                          "sym": stored.sym})
        elif isinstance(stored, GGUFWeight):
            tensors[f"{i}.data"] = torch.from_numpy(stored.data)
            parts.append({"kind": "gguf", "type": stored.type.name, "shape": list(stored.shape)})
        else:
            parts.append({"kind": None})
    return tensors, parts


def _to_bytes(kept: CompressedLayer) -> bytes:
    tensors, parts = layer_tensors(kept)
    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                metadata={"parts": json.dumps(parts)})


def safetensors_metadata(data: bytes) -> dict[str, str]:
    # safetensors: an 8-byte little-endian header length, then the JSON header (metadata)
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + header_len])["__metadata__"]


def _from_bytes(data: bytes) -> CompressedLayer:
    parts = json.loads(safetensors_metadata(data)["parts"])
    return layer_from_tensors(load(data), parts)


def layer_from_tensors(tensors: dict[str, torch.Tensor], parts: list[dict],
                       prefix: str = "") -> CompressedLayer:
    """``layer_tensors`` undone."""
    factors, masks, quantized = [], [], []
    for n, part in enumerate(parts):
        i = f"{prefix}{n}"
        factors.append(tensors.get(f"{i}.factor"))
        masks.append(tensors.get(f"{i}.mask"))
        if part["kind"] == "rtn":
            quantized.append(QuantizedWeight(tensors[f"{i}.q"], tensors[f"{i}.scale"],
                                             tensors[f"{i}.zero"], part["bits"],
                                             part["group_size"], part["sym"],
                                             tensors.get(f"{i}.input_scale")))
        elif part["kind"] == "gguf":
            quantized.append(GGUFWeight(gguf_type(part["type"]),
                                        np.ascontiguousarray(tensors[f"{i}.data"].numpy()),
                                        tuple(part["shape"])))
        else:
            quantized.append(None)
    return CompressedLayer(factors, masks, quantized)
