"""Predicted decode speed of the plans a search weighs: what ``--latency``/``--min-tps`` limit
(a second knapsack row, search/exact.py) and what the candidates' tok/s column shows.

Two predictors with one interface (``estimate(configs)``, ``limit(table, groups, seconds)``):
- ``DeviceDecode``: the latency model of a device profile (hardware/latency.py), for the
  formats autocompress's runtimes run;
- ``LlamaCppDecode``: a llama.cpp speed profile (`profile --engine llamacpp`,
  hardware/llamacpp_speed.py), for GGUF plans: llama.cpp's decode on the machine that
  measured it, per weight and stored type.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import AutocompressError
from ..hardware.architecture import Architecture
from ..hardware.latency import DecodeEstimate, LatencyModel
from ..hardware.llamacpp_speed import LlamaCppSpeed
from ..hardware.profile import DeviceProfile
from ..gguf_types import type_for_row
from ..model import LayerInfo, LoadedModel
from ..plan import LayerConfig, ModelIdentity, Plan, table_configs
from ..sensitivity.table import SensitivityTable
from .exact import Limit
from .problem import group_sums


def _limit(usage_s: np.ndarray, groups, fixed_s: float, max_latency_s: float, where: str,
           context: int) -> Limit:
    """The latency row: per decision group and option, predicted microseconds; the maximum is
    what the per-token limit leaves after the plan-independent part."""
    target = 1.0 / max_latency_s

    def describe(least_us: float) -> str:
        best = 1.0 / (fixed_s + least_us * 1e-6)
        return (f"no plan in the search space reaches {target:.1f} tokens/s "
                f"({max_latency_s * 1e3:.1f} ms/token) on {where}: the fastest predicts "
                f"{best:.1f} tokens/s at context {context}; relax --min-tps/--latency "
                "or allow fewer bits in the search space")
    return Limit(group_sums(usage_s * 1e6, groups), (max_latency_s - fixed_s) * 1e6, describe)


class DeviceDecode:
    """Predicted decode time of plans on a device profile (batch 1, at the search's context)."""

    def __init__(self, loaded: LoadedModel, device: DeviceProfile, context: int):
        self.model = LatencyModel(device)
        self.arch = Architecture.from_loaded(loaded)
        self.name = device.name
        self.context = context

    def estimate(self, configs: dict[str, LayerConfig]) -> DecodeEstimate:
        return self.model.decode(self.arch, [configs[layer.name] for layer in self.arch.layers],
                                 self.context)

    def limit(self, table: SensitivityTable, groups: list[list[int]], max_latency_s: float
              ) -> Limit:
        width = max(len(opts) for opts in table.options)
        usage = np.zeros((len(table.layers), width))
        for row, (layer, opts) in enumerate(zip(self.arch.layers, table.options)):
            for col, cfg in enumerate(opts):
                usage[row, col] = self.model.layer_seconds(*layer.shape, cfg)[0]
        fixed = self.model.fixed_decode_seconds(self.arch, self.context)
        return _limit(usage, groups, fixed, max_latency_s, self.name, self.context)


class LlamaCppDecode:
    """Predicted llama.cpp decode time of GGUF plans from a llama.cpp speed profile: the
    profile's reference-file time plus, per tensor, its weights times its stored type's cost
    relative to the reference (llama.cpp's fallback for short rows applied). The embedding
    and an untied head are the space's fixed tables."""

    def __init__(self, loaded: LoadedModel, speed: LlamaCppSpeed,
                 tables: dict[str, LayerConfig], context: int):
        """``loaded``: the model, or anything with its ``name``, ``identity``, ``layers`` and
        ``tables`` (``ModelShapes``: estimate predicts from a config, without weights)."""
        if speed.content_hash != loaded.identity.content_hash:
            raise AutocompressError(
                f"the llama.cpp speed profile was measured on {speed.model!r}, not on "
                f"{loaded.name!r} (other shapes): measure one with `autocompress profile "
                f"--engine llamacpp --model {loaded.spec}`")
        self.speed = speed
        self.layers = loaded.layers
        self.name = f"llama.cpp ({speed.machine}, {speed.threads} threads)"
        self.context = context
        self.fixed_s = speed.t0_s + sum(
            self._seconds(info.out_features, info.in_features, tables.get(info.name))
            for info in loaded.tables)

    def _seconds(self, rows: int, n: int, cfg: LayerConfig | None) -> float:
        """One tensor's decode seconds relative to the reference type (0 for the reference
        itself; a float16 entry counts as f16)."""
        name = cfg.gguf if cfg is not None and cfg.is_gguf else "f16"
        if cfg is not None and not (cfg.is_gguf or cfg.is_identity):
            raise AutocompressError(
                f"the llama.cpp speed profile predicts GGUF types, and {cfg.short()!r} is not "
                "one: search a GGUF space (--space gguf) or give --device for autocompress's "
                "own runtimes")
        stored = type_for_row(name, n).name
        if stored != self.speed.reference and stored not in self.speed.per_weight_s:
            raise AutocompressError(f"the llama.cpp speed profile has no figure for {stored}; "
                                    f"profile it too (profile --engine llamacpp --formats "
                                    f"{stored})")
        return self.speed.per_weight_s.get(stored, 0.0) * rows * n

    def estimate(self, configs: dict[str, LayerConfig]) -> DecodeEstimate:
        per_layer = {info.name: self._seconds(info.out_features, info.in_features,
                                              configs[info.name]) for info in self.layers}
        layers = sum(per_layer.values())
        return DecodeEstimate(seconds_per_token=self.fixed_s + layers, layers_s=layers,
                              head_s=0.0, kv_s=0.0, overhead_s=self.fixed_s, bytes_per_token=0,
                              context=self.context, per_layer_s=per_layer,
                              sources={"llamacpp profile": len(per_layer)})

    def limit(self, table: SensitivityTable, groups: list[list[int]], max_latency_s: float
              ) -> Limit:
        width = max(len(opts) for opts in table.options)
        usage = np.zeros((len(table.layers), width))
        for row, (info, opts) in enumerate(zip(self.layers, table.options)):
            for col, cfg in enumerate(opts):
                usage[row, col] = self._seconds(info.out_features, info.in_features, cfg)
        return _limit(usage, groups, self.fixed_s, max_latency_s, self.name, self.context)


@dataclass
class ModelShapes:
    """What a decode predictor reads of a model: its name, identity (the plan's), block
    linears and tables; from an Architecture (a config.json), so `estimate` loads no weights."""
    name: str
    identity: ModelIdentity
    layers: list[LayerInfo]
    tables: list[LayerInfo]

    @classmethod
    def of(cls, arch: Architecture, identity: ModelIdentity) -> "ModelShapes":
        return cls(arch.name, identity, list(arch.layers), arch.tables)


def predict_llamacpp_decode(plan: Plan, arch: Architecture, speed: LlamaCppSpeed,
                            context: int) -> DecodeEstimate:
    """A plan's llama.cpp decode time per token, from a llama.cpp speed profile of its model."""
    shapes = ModelShapes.of(arch, plan.model)
    decode = LlamaCppDecode(shapes, speed, table_configs(plan, [t.name for t in shapes.tables]),
                            context)
    return decode.estimate(plan.resolve(layer.name for layer in shapes.layers))
