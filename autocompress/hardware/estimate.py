"""A plan on a device, predicted: memory by part, whether it fits, decode speed, prefill time.
Needs only the model's architecture (a config.json is enough), never its weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..accounting import Footprint
from ..errors import AutocompressError
from ..plan import Plan
from .architecture import Architecture, read_config
from .latency import DecodeEstimate, LatencyModel, PrefillEstimate
from .memory import memory_breakdown
from .profile import DeviceProfile


@dataclass
class PlanEstimate:
    device: str
    footprint: Footprint
    usable_bytes: int
    decode: DecodeEstimate
    prefill: PrefillEstimate

    @property
    def fits(self) -> bool:
        return self.footprint.total <= self.usable_bytes

    def as_dict(self) -> dict:
        return {"device": self.device, "memory": self.footprint.as_dict(),
                "usable_bytes": self.usable_bytes, "fits": self.fits,
                "decode": self.decode.as_dict(),
                "prefill": {"tokens": self.prefill.tokens, "seconds": self.prefill.seconds}}


def architecture_for(plan: Plan, config: str | Path | None = None,
                     model: str | None = None) -> Architecture:
    """The architecture a plan is estimated on: a config.json, or the config of ``model`` or of
    the plan's own model (located without loading weights); checked against the plan."""
    from ..model import model_identity, resolve_model_path

    spec = model or plan.model.source or plan.model.name
    if config is None and spec.endswith(".json") and Path(spec).is_file():
        config = spec  # a plan written from a config (`plan --config`)
    if config is None:
        try:
            _, hf_dir = resolve_model_path(spec)
        except AutocompressError as exc:
            raise AutocompressError(f"{exc}; or give the model's config.json with --config") \
                from None
        config = hf_dir / "config.json"
    arch = read_config(config)
    if plan.model.layers:  # a plan made for a model names its layers: they must match
        plan.check_model(model_identity(arch.name, arch.layers))
    return arch


def estimate_plan(plan: Plan, arch: Architecture, profile: DeviceProfile, context: int = 2048,
                  batch: int = 1, kv_bits: int = 16, head_format: str | None = None,
                  prompt_tokens: int = 512) -> PlanEstimate:
    configs = [plan.config_for(layer.name) for layer in arch.layers]
    latency = LatencyModel(profile)
    head = latency.head_format(head_format)
    footprint = memory_breakdown(arch, configs, context, batch, kv_bits, head,
                                 profile.memory.runtime_overhead, profile)
    return PlanEstimate(
        device=profile.name, footprint=footprint, usable_bytes=profile.memory.usable_bytes,
        decode=latency.decode(arch, configs, context, head, kv_bits),
        prefill=latency.prefill(arch, configs, prompt_tokens, head))
