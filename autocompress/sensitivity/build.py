"""Build a sensitivity table from any proxy, with an on-disk cache that resumes per layer.

For every layer, the real error ΔW of each option is computed with the operators that apply
plans (compress/weights.py; GPTQ and Wanda with input statistics from one calibration pass),
and the proxy turns the ΔWs into costs; plain round-to-nearest options are scored in one pass
per group size without materialising their ΔW where the proxy allows (``rtn_costs``). Rows are
written to the cache as they are finished, so an interrupted build resumes at the next layer;
a cache for other inputs, or a corrupt one, is rebuilt with a line saying so.
"""

from __future__ import annotations

import hashlib
import math
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..accounting import layer_bytes
from ..compress.apply import hessian_layers, layer_stats, uses_calibration
from ..compress.calibration import InputStats, sequential
from ..compress.memo import LayerMemo, for_memo, memo_dir, worth_keeping
from ..compress.stats_store import StatsStore
from ..compress import gptq, lowrank
from ..compress.gguf import GGUFWeight
from ..compress.weights import GPTQSettings, LayerStats, compress_weight
from ..gguf_source import source_tensors
from ..io_utils import atomic_write_text
from .. import faults
from ..model import LayerInfo, LoadedModel, cache_dir, weights_fingerprint
from ..placement import dtype_name
from ..plan import LayerConfig
from .base import PROXIES, SensitivityProxy
from .table import SensitivityTable


def make_proxy(name: str) -> SensitivityProxy:
    from ..errors import AutocompressError
    from . import fisher, hessian, hutchinson, measured  # noqa: F401  (register the proxies)

    try:
        return PROXIES[name]()
    except KeyError:
        raise AutocompressError(
            f"unknown proxy {name!r}: choose from {', '.join(sorted(PROXIES))}") from None


def table_key(loaded: LoadedModel, calib_digest: str, options: list[list[LayerConfig]],
              proxy: SensitivityProxy) -> dict:
    option_digest = hashlib.sha256(json.dumps(
        [[o.to_dict() for o in opts] for opts in options],
        sort_keys=True).encode()).hexdigest()[:16]
    from dataclasses import asdict

    from ..compress.weights import GPTQSettings

    key = {"model": loaded.identity.content_hash, "weights": weights_fingerprint(loaded),
           "calib": calib_digest, "options": option_digest,
           "gptq": asdict(GPTQSettings()), "gguf_source_copy": True, **proxy.describe()}
    # A table computed in another precision is another table; float32 adds no key so that
    # caches written before the dtype option stay valid.
    compute_dtype = dtype_name(loaded.placement.dtype)
    if compute_dtype != "float32":
        key["dtype"] = compute_dtype
    return key


class TableCache:
    """Rows of one table under construction, in one JSON file written atomically per row."""

    def __init__(self, path: Path, key: dict, log: Callable[[str], None] = print):
        self.path, self.key, self.log = Path(path), key, log
        self.rows: dict[str, dict] = {}
        self.prepared: dict | None = None  # the proxy's prepared_state, where it keeps one
        if not self.path.is_file():
            return
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("rows"), dict):
                raise ValueError("no rows")
        except (ValueError, UnicodeDecodeError):
            log(f"sensitivity cache {self.path} is corrupt; rebuilding it")
            return
        if data.get("key") != key:
            log(f"sensitivity cache {self.path} is for other inputs; rebuilding it")
            return
        self.rows = data["rows"]
        self.prepared = data.get("prepared")
        if self.rows:
            log(f"reusing {len(self.rows)} cached rows of {self.path}")

    @classmethod
    def default_path(cls, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return cache_dir() / "sensitivity" / f"{key['proxy']}-{digest}.json"

    def drop_malformed(self, n_options: dict[str, int]) -> None:
        """Rows that are not one finite cost and one byte count per option (a hand edit, a
        bad disk) are dropped, so they are computed again, and said."""
        bad = [name for name, row in self.rows.items()
               if name in n_options and not _row_ok(row, n_options[name])]
        for name in bad:
            del self.rows[name]
        if bad:
            self.log(f"sensitivity cache {self.path}: {len(bad)} malformed row(s) "
                     f"({', '.join(bad[:3])}) dropped; computing them again")

    def put(self, layer: str, cost: list[float], size: list[int]) -> None:
        self.rows[layer] = {"cost": cost, "bytes": size}
        self._write()

    def keep_prepared(self, state: dict | None) -> None:
        if state is not None:
            self.prepared = state
            self._write()

    def _write(self) -> None:
        data = {"key": self.key, "rows": self.rows}
        if self.prepared is not None:
            data["prepared"] = self.prepared
        atomic_write_text(self.path, json.dumps(data))


def _row_ok(row, n: int) -> bool:
    if not isinstance(row, dict):
        return False
    cost, size = row.get("cost"), row.get("bytes")
    if not (isinstance(cost, list) and isinstance(size, list) and len(cost) == len(size) == n):
        return False
    return all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c)
               for c in cost) and all(isinstance(b, int) and b > 0 for b in size)


def is_plain_rtn(cfg: LayerConfig) -> bool:
    """Quantized by round-to-nearest only: no pruning, no low rank, no GPTQ, min/max grid,
    no input scaling."""
    return (cfg.bits < 16 and cfg.method == "rtn" and not cfg.is_pruned and not cfg.is_low_rank
            and not cfg.clip and not cfg.awq)


def layer_costs(proxy: SensitivityProxy, layer, weight: torch.Tensor,
                options: list[LayerConfig], stats: LayerStats | None,
                source: GGUFWeight | None = None, memo: LayerMemo | None = None) -> list[float]:
    """The proxy's cost of every option of one layer: plain RTN options in one pass where the
    proxy can (``rtn_costs``), the others from the ΔW their operators really produce (an option
    of the type the source GGUF stores the layer in keeps its bytes: ΔW = 0). ``memo``: where
    the expensive ones' results go, for the plans the search builds from the same
    statistics."""
    plain = [k for k, cfg in enumerate(options) if is_plain_rtn(cfg)]
    fast = proxy.rtn_costs(layer, weight, [(options[k].bits, options[k].group_size,
                                            options[k].sym) for k in plain]) if plain else None
    done = dict(zip(plain, fast)) if fast is not None else {}
    rest = [k for k in range(len(options)) if k not in done]
    deltas = []
    # the options of one weight share its GPTQ factor and its low-rank factorization
    with gptq.sharing_factors(), lowrank.sharing_factors():
        for k in rest:
            built = compress_weight(weight, options[k], stats, source=source)
            if memo is not None and worth_keeping(options[k]):
                memo[(layer.name, options[k])] = for_memo(built)
            deltas.append(built.weight() - weight)
    done.update(zip(rest, proxy.layer_costs(layer, weight, deltas) if rest else []))
    return [done[k] for k in range(len(options))]


def build_table(loaded: LoadedModel, space, proxy: SensitivityProxy, windows: torch.Tensor,
                calib_digest: str, cache: TableCache | Path | None = None,
                progress: bool = True, log: Callable[[str], None] = print,
                stats_store: StatsStore | None = None) -> SensitivityTable:
    """The table of ``proxy``'s costs for every layer × option of ``space``, from the rows in
    ``cache`` and the rest computed. A proxy that can (``prepare_blocks``) runs block by
    block: one block's gradients, statistics and rows at a time. ``stats_store``: where the
    calibration statistics taken here are written, for the plans built after, and beside
    them the memo of the expensive options' results (GPTQ, low rank, GGUF types), which the
    table computes anyway."""
    layers = loaded.layers
    options = [space.for_layer(layer) for layer in layers]
    key = table_key(loaded, calib_digest, options, proxy)
    if not isinstance(cache, TableCache):
        cache = TableCache(cache or TableCache.default_path(key), key, log)
    cache.drop_malformed({layer.name: len(opts) for layer, opts in zip(layers, options)})
    todo = [layer for layer in layers if layer.name not in cache.rows]
    if todo:
        options_of = {layer.name: opts for layer, opts in zip(layers, options)}
        calibrated = uses_calibration(o for layer in todo for o in options_of[layer.name])
        full = hessian_layers(todo, lambda layer: options_of[layer.name])
        source = source_tensors(loaded)
        memo = None if stats_store is None or not calibrated else LayerMemo(
            0, memo_dir(stats_store.directory, GPTQSettings()))  # on disk only
        bar = tqdm(total=len(todo), desc=f"{proxy.name} table", disable=not progress,
                   leave=False)

        def rows(some: list[LayerInfo], stats: Mapping[str, InputStats] | None) -> None:
            if stats and stats_store is not None:
                stats_store.put(dict(stats))
            for layer in some:
                weight = loaded.module(layer.name).weight.detach().float()
                cost = layer_costs(proxy, layer, weight, options_of[layer.name],
                                   layer_stats(stats[layer.name]) if stats else None,
                                   source.stored(layer.name) if source is not None and any(
                                       cfg.is_gguf for cfg in options_of[layer.name]) else None,
                                   memo)
                size = [layer_bytes(layer.out_features, layer.in_features, cfg)
                        for cfg in options_of[layer.name]]
                cache.put(layer.name, cost, size)
                bar.update()
                faults.point("sensitivity_row")

        if proxy.blockwise:
            proxy.prepare_blocks(loaded, windows, todo,
                                 lambda block_layers, stats: rows(block_layers,
                                                                  stats if calibrated else None),
                                 hessian_layers=full if calibrated else set(), progress=progress)
        else:
            # a resumed build scores its remaining layers with the first attempt's preparation
            # where the proxy keeps one: the table is then the uninterrupted build's
            if proxy.restore_prepared(cache.prepared, todo):
                log(f"reusing the {proxy.name} proxy's preparation from {cache.path}")
            else:
                proxy.prepare(loaded, windows, todo, progress=progress)
                cache.keep_prepared(proxy.prepared_state())
            if calibrated:
                # the statistics one block at a time: one pass over the whole model would hold
                # every layer's E[x xᵀ] at once (10 GB on a 1.5B model, 18 GB of float64 sums)
                sequential(loaded.model, todo, windows,
                           lambda index, stats, _runner: rows(
                               [layer for layer in todo if layer.block == index], stats),
                           progress=progress, hessian_layers=full)
            else:
                rows(todo, None)
        bar.close()
    return SensitivityTable(
        layers=[layer.name for layer in layers], options=options,
        cost=[cache.rows[layer.name]["cost"] for layer in layers],
        bytes=[cache.rows[layer.name]["bytes"] for layer in layers],
        proxy=proxy.name,
        meta={"key": key, "windows": int(windows.shape[0]), "window_len": int(windows.shape[1])},
    )
