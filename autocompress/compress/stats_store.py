"""Calibration statistics on disk: taken once, read by whoever builds a plan.

The search's statistics (E[x xᵀ] of every input that GPTQ or a low-rank option may read, the
mean x² of the others) come from the uncompressed model on the calibration windows: the
sensitivity table needs them, and so does every plan level 2 builds. Held in memory they were
400 MB in float32 on SmolLM2 and 10 GB on Qwen2.5-1.5B (ffn_down's input is 8960 wide), for
the whole search. Here each distinct input's statistics are one safetensors file, written
when they are computed (the table's backward pass, or a forward pass block by block) and read
when a layer needs them; a few stay in memory (q, k and v read the same file). Level 2's Ray
workers read the same directory instead of computing their own.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load, save

from ..io_utils import atomic_write_bytes, atomic_write_text
from ..model import LayerInfo
from .calibration import BlockRunner, InputStats, input_group

KEY_FILE = "key.json"


def stats_key(loaded, calib_digest: str) -> dict:
    """What a model's calibration statistics depend on: its weights, the calibration windows,
    the dtype it computes in."""
    from ..model import weights_fingerprint

    return {"model": loaded.identity.content_hash, "weights": weights_fingerprint(loaded),
            "calib": calib_digest, "dtype": loaded.placement.dtype_name}


class StatsStore(Mapping):
    """Layer name -> InputStats, from one file per distinct input in ``directory``.

    ``key`` says what the statistics were taken from (model weights, calibration windows,
    which inputs keep the full matrix, dtype); a directory holding statistics of another key
    is emptied. ``directory=None``: a temporary directory, removed with the store."""

    def __init__(self, directory: str | Path | None, layers: list[LayerInfo], key: dict | None,
                 hessian_layers: set[str] | None, device: torch.device | str = "cpu",
                 cached_groups: int = 4):
        self._tmp = None
        if directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="autocompress-stats-")
            directory = self._tmp.name
        self.directory = Path(directory)
        self.layers = {layer.name: layer for layer in layers}
        self.device = torch.device(device)  # where the statistics are read to (the model's)
        self.hessian_layers = hessian_layers
        self.key = {**(key or {}), "hessian": None if hessian_layers is None else sorted(hessian_layers)}
        self._cache: OrderedDict[tuple, InputStats] = OrderedDict()
        self._cached_groups = cached_groups
        self._complete = False
        if key is not None:
            self._open()

    @classmethod
    def reader(cls, directory: str | Path, layers: list[LayerInfo],
               device: torch.device | str = "cpu") -> "StatsStore":
        """The store another process writes in ``directory`` (a level-2 worker reading the
        driver's statistics), as it is: never emptied from here."""
        key = json.loads((Path(directory) / KEY_FILE).read_text())
        hessian = key.get("hessian")
        store = cls(directory, layers, None, None if hessian is None else set(hessian), device)
        store.key = key
        return store

    def _open(self) -> None:
        key_file = self.directory / KEY_FILE
        try:
            same = json.loads(key_file.read_text()) == self.key
        except (OSError, ValueError):
            same = False
        if not same:
            if self.directory.exists():
                shutil.rmtree(self.directory)
            self.directory.mkdir(parents=True)
            atomic_write_text(key_file, json.dumps(self.key, sort_keys=True))

    def _path(self, group: tuple) -> Path:
        block, name = group
        return self.directory / f"{'x' if block is None else block}-{name}.safetensors"

    def has(self, layer: LayerInfo) -> bool:
        return self._path(input_group(layer)).is_file()

    @property
    def complete(self) -> bool:
        if not self._complete:  # once complete, always (files are only ever added)
            self._complete = all(self.has(layer) for layer in self.layers.values())
        return self._complete

    def missing(self) -> list[LayerInfo]:
        return [layer for layer in self.layers.values() if not self.has(layer)]

    def put(self, stats: dict[str, InputStats]) -> None:
        """Write the statistics of some layers (layers sharing an input share one file)."""
        written: set[tuple] = set()
        for name, value in stats.items():
            group = input_group(self.layers[name])
            if group in written:
                continue
            written.add(group)
            tensors = {"act_norm": value.act_norm.contiguous().cpu()}
            if value.hessian is not None:
                tensors["hessian"] = value.hessian.contiguous().cpu()
            if value.mean_square is not None:
                tensors["mean_square"] = value.mean_square.contiguous().cpu()
            atomic_write_bytes(self._path(group),
                               save(tensors, metadata={"n_samples": str(value.n_samples)}))

    def __getitem__(self, name: str) -> InputStats:
        group = input_group(self.layers[name])
        if group in self._cache:
            self._cache.move_to_end(group)
            return self._cache[group]
        path = self._path(group)
        if not path.is_file():
            raise KeyError(name)
        value = self._read(path)
        self._cache[group] = value
        while len(self._cache) > self._cached_groups:
            self._cache.popitem(last=False)
        return value

    def _read(self, path: Path) -> InputStats:
        """One file's statistics, copied onto the model's device (the one transfer here)."""
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            n_samples = int(f.metadata()["n_samples"])
        tensors = {name: t.to(self.device)  # a copy: the file may be replaced while in use
                   for name, t in load(path.read_bytes()).items()}
        return InputStats(tensors.get("hessian"), tensors["act_norm"], n_samples,
                          tensors.get("mean_square"))

    def __iter__(self):
        return (name for name, layer in self.layers.items() if self.has(layer))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def fill(self, model: torch.nn.Module, windows: torch.Tensor,
             progress: bool = True) -> "StatsStore":
        """Compute what is missing: the unchanged model run block by block over ``windows``
        (one block's statistics in memory at a time, each written as its block is done)."""
        from tqdm.auto import tqdm

        from ..residency import release_module

        from .apply import IN_PLACE

        missing = self.missing()
        if not missing:
            return self
        if getattr(model, IN_PLACE, False):
            raise RuntimeError("statistics are taken from the uncompressed model; a plan is "
                               "in place")
        by_block: dict[int, list[LayerInfo]] = {}
        for layer in missing:
            by_block.setdefault(layer.block, []).append(layer)
        runner = BlockRunner(model, windows)
        last = max(by_block)
        for index in tqdm(range(last + 1), desc="calibration statistics", disable=not progress,
                          leave=False):
            if index in by_block:
                self.put(runner.run_block(index, by_block[index], self.hessian_layers))
            if index < last:
                runner.advance(index)
            release_module(runner.blocks[index])
        return self

    def close(self) -> None:
        self._cache.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
