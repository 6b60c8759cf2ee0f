"""Memory model: what a plan needs resident on a device, by part.

weights of the block linears at the plan's formats + embeddings and head (at ``head_format``;
norms in float16) + KV cache (context × batch at ``kv_bits``) + activation workspace of a chunked
prefill + what the runtime itself holds (from the device profile).

A block linear's bytes are the plan's accounting unless the device profile says its engine
keeps that format otherwise (``formats[f].held_as``: 3-bit codes in a 4-bit container, 2:4
weights densified) or in a layout of its own (``resident_ratio``, measured).
"""

from __future__ import annotations

from typing import Iterable

from ..accounting import Footprint, kv_cache_bytes, layer_bytes, workspace_bytes
from ..errors import AutocompressError
from ..plan import LayerConfig
from ..units import format_size
from .architecture import Architecture
from .formats import format_bytes, format_config, held_config, layer_format
from .profile import DeviceProfile


def embedding_head_bytes(arch: Architecture, head_format: str = "f16") -> int:
    """Embedding table and LM head (once when tied) at ``head_format``; other params in f16."""
    tables = 1 if arch.tied_embeddings else 2
    table_bytes = format_bytes(head_format, arch.dims.vocab, arch.dims.hidden)
    rest = max(0, arch.other_params - tables * arch.head_params)
    return tables * table_bytes + 2 * rest


def held_layer_bytes(out_features: int, in_features: int, cfg: LayerConfig,
                     profile: DeviceProfile | None = None) -> int:
    """Bytes the device's engine holds for one layer: the plan's accounting, or that of the
    format the profile says the engine keeps it in, times the measured resident ratio."""
    speed = None if profile is None else \
        profile.format_speed(layer_format(cfg, profile.compute.float_dtype))
    if speed is None:
        return layer_bytes(out_features, in_features, cfg)
    held = cfg if speed.held_as is None else held_config(cfg, format_config(speed.held_as).bits)
    return round(layer_bytes(out_features, in_features, held) * speed.resident_ratio)


def memory_breakdown(arch: Architecture, configs: Iterable[LayerConfig], context: int = 2048,
                     batch: int = 1, kv_bits: int = 16, head_format: str = "f16",
                     runtime_overhead: int = 0, profile: DeviceProfile | None = None
                     ) -> Footprint:
    """``configs``: one LayerConfig per ``arch.layers`` entry, in order; ``profile``: the
    device whose engine holds the layers (None: the plan's accounting)."""
    configs = list(configs)
    if len(configs) != len(arch.layers):
        raise AutocompressError(f"{len(configs)} layer configs for {len(arch.layers)} layers")
    return Footprint(
        layer_weights=sum(held_layer_bytes(*layer.shape, cfg, profile)
                          for layer, cfg in zip(arch.layers, configs)),
        other_weights=embedding_head_bytes(arch, head_format),
        kv_cache=kv_cache_bytes(arch.dims, context, batch, kv_bits),
        workspace=workspace_bytes(arch.dims, context, batch),
        runtime_overhead=runtime_overhead,
    )


def check_fits(footprint: Footprint, capacity: int, where: str) -> None:
    """One clear line when a plan does not fit ``capacity`` bytes."""
    if footprint.total > capacity:
        raise AutocompressError(
            f"the plan needs {format_size(footprint.total)} but {where} has "
            f"{format_size(capacity)} for it (weights {format_size(footprint.weights)}, "
            f"KV cache {format_size(footprint.kv_cache)}, workspace "
            f"{format_size(footprint.workspace)}, runtime {format_size(footprint.runtime_overhead)}); "
            "compress further or shorten --context")
