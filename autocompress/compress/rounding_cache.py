"""Learned rounding's results kept on disk block by block, so that a build resumes where it
stopped and later builds of the same plan reuse them.

Tuning the rounding of SmolLM2-135M's 30 blocks takes about half an hour here (a 1.5B model
hours): an interrupted build would otherwise start again from the first block, and `eval`,
`apply` and `export` of a plan the search rounded would tune it all again. Each block's tuned
codes, scales and zeros are written (atomically) as soon as the block is done, under a key of
everything they depend on: the model's weights, every layer's config (the compressed prefix
and the block's other layers shape the block's inputs and its error), the calibration windows
and the tuning and GPTQ settings. A resumed or repeated build reads the blocks it finds and
tunes the rest; its blocks then hold the very codes the first build measured.

Where: ``$AUTOCOMPRESS_CACHE/rounding/KEY/`` (default ``~/.cache/autocompress``); delete the
folder to forget them. An unreadable entry is tuned again and rewritten, with a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from ..data import windows_digest
from ..io_utils import atomic_write_bytes
from ..plan import LayerConfig
from .memo import layer_from_tensors, layer_tensors, safetensors_metadata
from .quant import QuantizedWeight
from .weights import CompressedLayer
from .signround import SignRoundSettings

FORMAT = 2  # 2: blocks in the memo's layer format


def build_key(fingerprint: str, configs: dict[str, LayerConfig], calib_windows: torch.Tensor,
              gptq, settings: SignRoundSettings, dtype: torch.dtype) -> str:
    """A digest of what a build's learned rounding depends on."""
    windows = calib_windows.detach().cpu().contiguous()
    described = {
        "format": FORMAT,
        "weights": fingerprint,
        "configs": {name: cfg.to_dict() for name, cfg in sorted(configs.items())},
        "calib": [list(windows.shape), windows_digest(windows)],
        "gptq": dataclasses.asdict(gptq),
        "signround": dataclasses.asdict(settings),
        "dtype": str(dtype),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:20]


class RoundingCache:
    """Block index -> the tuned QuantizedWeight of each of its learned layers (by name), one
    file a block, in the memo's layer format (memo.layer_tensors)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def _path(self, index: int) -> Path:
        return self.directory / f"block-{index:04d}.safetensors"

    def get(self, index: int, names: list[str]) -> dict[str, QuantizedWeight] | None:
        """The block's tuned weights, or None when they are not all there."""
        path = self._path(index)
        if not path.is_file():
            return None
        try:
            data = path.read_bytes()
            parts = json.loads(safetensors_metadata(data)["parts"])
            tensors = load(data)
            return {name: layer_from_tensors(tensors, parts[name], f"{name}.").quantized[0]
                    for name in names}
        except (SafetensorError, KeyError, ValueError, OSError) as exc:
            warnings.warn(f"learned-rounding cache entry {path} is unreadable ({exc}); tuning "
                          "that block again", stacklevel=2)
            return None

    def put(self, index: int, quantized: dict[str, QuantizedWeight]) -> None:
        tensors, parts = {}, {}
        for name, qw in quantized.items():
            named, parts[name] = layer_tensors(CompressedLayer([None], [None], [qw]), f"{name}.")
            tensors.update({k: v.contiguous() for k, v in named.items()})
        atomic_write_bytes(self._path(index), save(tensors, metadata={"parts": json.dumps(parts)}))


def rounding_cache_for(loaded, configs: dict[str, LayerConfig], calib_windows: torch.Tensor,
                       gptq, settings: SignRoundSettings = SignRoundSettings()) -> RoundingCache:
    from ..model import cache_dir, weights_fingerprint

    key = build_key(weights_fingerprint(loaded), configs, calib_windows, gptq, settings,
                    next(loaded.model.parameters()).dtype)
    return RoundingCache(cache_dir() / "rounding" / key)
