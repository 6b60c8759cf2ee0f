"""Latency model: seconds per layer on a device, decode tokens/s and prefill time of a plan.

Per matrix (a low-rank layer has two), the device profile's measured lookup table where it has
the format and shape; else a roofline at the layer's format:

    t = max(bytes / (bandwidth · efficiency[format]),  flops / (peak[float dtype] · compute_eff))
        + launch overhead

bytes = the packed weight (exact accounting) + activations in and out; flops = 2 · tokens · out ·
in, halved for 2:4 storage where the device's tensor cores skip the zeros. A format without a
fast kernel on the profile's engine uses the profile's fallback efficiency.

Decode at batch 1 reads every weight once per token (memory-bound), plus the head and the KV
cache; the non-matmul work of each block (norms, rope, attention, residuals) is the profile's
per-block overhead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

from ..accounting import layer_bytes, matrix_bits, rank_for
from ..plan import LayerConfig
from .architecture import Architecture
from .formats import format_bytes, layer_format
from .memory import held_layer_bytes
from .profile import DeviceProfile


@dataclass
class DecodeEstimate:
    seconds_per_token: float
    layers_s: float
    head_s: float
    kv_s: float
    overhead_s: float
    bytes_per_token: int
    context: int
    per_layer_s: dict[str, float] = field(default_factory=dict, repr=False)
    sources: dict[str, int] = field(default_factory=dict)  # lookup / roofline / fallback counts

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.seconds_per_token

    def as_dict(self) -> dict:
        return {"seconds_per_token": self.seconds_per_token, "tokens_per_s": self.tokens_per_s,
                "layers_s": self.layers_s, "head_s": self.head_s, "kv_s": self.kv_s,
                "overhead_s": self.overhead_s, "bytes_per_token": self.bytes_per_token,
                "context": self.context, "sources": dict(self.sources)}


@dataclass
class PrefillEstimate:
    seconds: float
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


class LatencyModel:
    def __init__(self, profile: DeviceProfile):
        self.profile = profile
        compute = profile.compute
        peaks = compute.peak_tflops
        float_peaks = [peaks.get(d) for d in (compute.float_dtype, "f16", "bf16", "f32")]
        self.float_peak = 1e12 * next((p for p in float_peaks if p), max(peaks.values()))
        self.bandwidth = profile.memory.bandwidth_gbps * 1e9
        self.launch_s = profile.overhead.launch_us * 1e-6
        # indexed once: a search asks for every layer of every option and every trial's plan
        self.lookup = {(e.format, e.out_features, e.in_features, e.tokens): e
                       for e in profile.lookup}

    # -- one matrix / one layer ----------------------------------------------------------------

    def format_of(self, cfg: LayerConfig) -> str:
        return layer_format(cfg, self.profile.compute.float_dtype)

    def matrix_seconds(self, fmt: str, out_features: int, in_features: int, nbytes: int,
                       tokens: int = 1, group_size: int | None = None) -> tuple[float, str]:
        """Seconds for ``tokens`` rows through one [out, in] matrix of ``nbytes`` in ``fmt``,
        and where the figure came from (lookup, roofline or fallback)."""
        entry = self.lookup.get((fmt, out_features, in_features, tokens))
        if entry is not None:
            measured_bytes = nbytes
            if entry.group_size is not None and group_size is not None \
                    and entry.group_size != group_size and fmt[0] == "q":
                measured_bytes = layer_bytes(out_features, in_features,
                                             LayerConfig(bits=int(fmt[1]),
                                                         group_size=entry.group_size))
            # the byte-proportional part scales with the stored bytes; the launch does not
            moving = max(entry.seconds - self.launch_s, 0.0)
            return self.launch_s + moving * nbytes / measured_bytes, "lookup"
        speed = self.profile.format_speed(fmt)
        source = "roofline"
        if speed is None:
            efficiency, compute_eff, source = self.profile.fallback.efficiency, 0.5, "fallback"
        else:
            efficiency, compute_eff = speed.efficiency, speed.compute_efficiency
        activations = tokens * (in_features + out_features) * 2
        flops = 2.0 * tokens * out_features * in_features
        if fmt.endswith("+2:4") and self.profile.compute.sparse_2_4:
            flops /= 2
        memory_s = (nbytes + activations) / (self.bandwidth * efficiency)
        compute_s = flops / (self.float_peak * compute_eff)
        return self.launch_s + max(memory_s, compute_s), source

    def layer_seconds(self, out_features: int, in_features: int, cfg: LayerConfig,
                      tokens: int = 1) -> tuple[float, str]:
        fmt = self.format_of(cfg)
        if cfg.is_low_rank:
            r = rank_for(out_features, in_features, cfg.rank_ratio)
            total, sources = 0.0, []
            for o, i in ((r, in_features), (out_features, r)):  # B then A
                seconds, source = self.matrix_seconds(
                    fmt, o, i, _bytes(o, i, cfg), tokens, cfg.group_size)
                total += seconds
                sources.append(source)
            return total, ("lookup" if all(s == "lookup" for s in sources) else sources[-1])
        return self.matrix_seconds(fmt, out_features, in_features,
                                   _bytes(out_features, in_features, cfg), tokens, cfg.group_size)

    # -- whole model ---------------------------------------------------------------------------

    def head_format(self, head_format: str | None) -> str:
        return head_format or self.profile.compute.float_dtype

    def decode(self, arch: Architecture, configs: Iterable[LayerConfig], context: int = 512,
               head_format: str | None = None, kv_bits: int = 16) -> DecodeEstimate:
        """One decoded token at batch 1 with ``context`` tokens in the KV cache."""
        configs = list(configs)
        per_layer: dict[str, float] = {}
        sources: dict[str, int] = {}
        layer_bytes_total = 0
        for layer, cfg in zip(arch.layers, configs, strict=True):
            seconds, source = self.layer_seconds(*layer.shape, cfg)
            per_layer[layer.name] = seconds
            sources[source] = sources.get(source, 0) + 1
            layer_bytes_total += held_layer_bytes(*layer.shape, cfg, self.profile)
        head_s, head_bytes = self.head_seconds(arch, head_format)
        kv_bytes = int(2 * arch.dims.n_blocks * arch.dims.n_kv_heads * arch.dims.head_dim
                       * context * kv_bits / 8)
        float_eff = self._float_efficiency()
        kv_s = kv_bytes / (self.bandwidth * float_eff)
        overhead_s = arch.dims.n_blocks * self.profile.block_overhead_s \
            + self.profile.overhead.token_us * 1e-6
        layers_s = sum(per_layer.values())
        return DecodeEstimate(
            seconds_per_token=layers_s + head_s + kv_s + overhead_s, layers_s=layers_s,
            head_s=head_s, kv_s=kv_s, overhead_s=overhead_s,
            bytes_per_token=layer_bytes_total + head_bytes + kv_bytes, context=context,
            per_layer_s=per_layer, sources=sources)

    def head_seconds(self, arch: Architecture, head_format: str | None = None) -> tuple[float, int]:
        fmt = self.head_format(head_format)
        nbytes = format_bytes(fmt, arch.dims.vocab, arch.dims.hidden)
        seconds, _ = self.matrix_seconds(fmt, arch.dims.vocab, arch.dims.hidden, nbytes, 1, 64)
        return seconds, nbytes

    def fixed_decode_seconds(self, arch: Architecture, context: int = 512,
                             head_format: str | None = None, kv_bits: int = 16) -> float:
        """Per-token time that no layer choice changes: head, KV cache, overheads."""
        empty = Architecture(arch.name, arch.dims, [], arch.other_params, arch.tied_embeddings)
        return self.decode(empty, [], context, head_format, kv_bits).seconds_per_token

    def prefill(self, arch: Architecture, configs: Iterable[LayerConfig], tokens: int = 512,
                head_format: str | None = None) -> PrefillEstimate:
        """Prompt processing of ``tokens`` at batch 1 (logits of the last position only)."""
        total = 0.0
        for layer, cfg in zip(arch.layers, configs, strict=True):
            total += self.layer_seconds(*layer.shape, cfg, tokens=tokens)[0]
        dims = arch.dims
        # causal attention: QKᵀ and AV, half the square on average
        attention_flops = 2 * 2 * dims.n_blocks * dims.n_heads * dims.head_dim * tokens * tokens / 2
        total += attention_flops / (self.float_peak * 0.5)
        total += self.head_seconds(arch, head_format)[0]
        total += dims.n_blocks * self.profile.block_overhead_s
        return PrefillEstimate(seconds=total, tokens=tokens)

    def _float_efficiency(self) -> float:
        speed = self.profile.format_speed(self.profile.compute.float_dtype)
        return speed.efficiency if speed else self.profile.fallback.efficiency


def _bytes(out_features: int, in_features: int, cfg: LayerConfig) -> int:
    """Bytes of one dense [out, in] matrix under cfg (low rank handled by the caller)."""
    return math.ceil(matrix_bits(out_features, in_features, cfg) / 8)

