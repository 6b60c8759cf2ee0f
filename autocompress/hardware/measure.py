"""`autocompress profile`: measure the machine it runs on and write a device profile.

What it measures (CPU, with the packed runtime's own kernels, the way a decode step calls them):
- memory bandwidth: the best of several copies of a large tensor (bytes read + written);
- dense matmul throughput per float dtype (a square GEMM);
- the latency of one linear layer in every runtime format at each of the model's layer shapes
  (and its low-rank factors' shapes), for one token, timed inside a stack of the model's layers
  in order (each with its own weights, so caches hold what they would in a decode step), and
  the head's: the profile's lookup table;
- the bytes each format's kernels hold (``held_as``, ``resident_ratio``). The achieved share of the measured
  bandwidth per format (median over shapes, at most 1: small layers run from cache) is its
  efficiency for shapes not in the table;
- the work of a transformer block outside its linears (norms, rope, attention over a short
  context, residuals, the Python around them), from decode steps of two small models of the same
  attention geometry that differ only in their number of blocks; and one op's dispatch cost.
"""

from __future__ import annotations

import datetime
import gc
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..plan import LayerConfig
from ..runtime.memory import heap_available
from .architecture import Architecture
from .formats import held_config, layer_format
from .profile import SCHEMA_VERSION, DeviceProfile

# formats of the packed runtime measured by default (group 64, asymmetric: the plans' default)
RUNTIME_FORMATS: tuple[LayerConfig, ...] = (
    LayerConfig(bits=16),
    *(LayerConfig(bits=b, group_size=64) for b in (2, 3, 4, 5, 6, 8)),
    # the pruning method does not change the stored format; magnitude needs no calibration
    LayerConfig(bits=4, group_size=64, sparsity=0.5, pattern="2:4", prune_method="magnitude"),
    LayerConfig(bits=4, group_size=64, sparsity=0.5, prune_method="magnitude"),
    LayerConfig(bits=8, group_size=64, sparsity=0.5, prune_method="magnitude"),
)


def formats_from_names(names: str) -> tuple[LayerConfig, ...]:
    """``f16,q4,q3,q4+2:4`` -> the LayerConfigs measured for those formats (group 64)."""
    from ..errors import AutocompressError
    from .profile import check_format_name

    configs = []
    for name in filter(None, (n.strip() for n in names.split(","))):
        try:
            check_format_name(name)
        except ValueError as exc:
            raise AutocompressError(f"--formats: {exc}") from None
        base, _, sparse = name.partition("+")
        bits = 16 if base in ("f16", "bf16", "f32") else int(base[1:])
        extra = {}
        if sparse == "2:4":
            extra = dict(sparsity=0.5, pattern="2:4", prune_method="magnitude")
        elif sparse == "sparse":
            extra = dict(sparsity=0.5, prune_method="magnitude")
        configs.append(LayerConfig(bits=bits, group_size=64, **extra))
    if not configs:
        raise AutocompressError("--formats needs at least one format, e.g. f16,q4,q8")
    return tuple(configs)


HEAD_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def median_seconds(fn: Callable[[], object], min_runs: int = 5, budget_s: float = 0.3,
                   max_runs: int = 2000) -> float:
    fn()  # warm-up: first calls allocate and prepack
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget_s
                                    and len(times) < max_runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_bandwidth(size_bytes: int = 256 << 20, repeats: int = 6) -> float:
    """Bytes per second of a large tensor copy, counting the bytes read and written."""
    src = torch.ones(size_bytes // 4)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * size_bytes / best


def matmul_tflops(dtype: torch.dtype, n: int = 512) -> float:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    seconds = median_seconds(lambda: a @ b, min_runs=3, budget_s=0.5)
    return 2 * n ** 3 / seconds / 1e12


def dispatch_seconds() -> float:
    """One small torch op from Python: the floor of every kernel call here."""
    x = torch.randn(576)
    return median_seconds(lambda: x.add(1.0), budget_s=0.2)


@dataclass
class HeldBytes:
    """What a format's layers hold once built as the runtime builds them (``held_bytes``)."""

    held_as: LayerConfig | None  # the dense format the kernels keep the weights in, if another
    resident_bytes: int  # C-heap bytes the layers hold, as run
    accounted_bytes: int  # their accounting in the held format

    @property
    def resident_ratio(self) -> float:
        return self.resident_bytes / self.accounted_bytes


def held_format(packed) -> LayerConfig | None:
    """The dense format the ``auto`` CPU backend keeps a packed layer's weights in, when its
    kernel needs another container (3/5/6-bit codes widened, sparse ones densified)."""
    from ..runtime.cpu_kernels import ort_available, ort_ready

    matrix = packed.matrices[0]
    ready = ort_ready(matrix, widen=True) if ort_available() else None
    if ready is None or ready.kind == "ort":
        return None
    return held_config(packed.config, ready.matrix.bits)


def held_bytes(cfg: LayerConfig, arch: Architecture, max_bytes: int = 256 << 20) -> HeldBytes:
    """The C heap before and after building the model's layers in ``cfg`` the way the packed
    runtime installs them (backend auto, q/k/v and gate/up sharing a session): what the kernels
    really hold (ONNX Runtime's prepacked layout and its sessions, widened or densified codes)
    against the accounting of the format they are held in. Up to ``max_bytes`` of layers: the
    whole model when it is that small, else its first blocks (the same shapes again)."""
    from ..accounting import layer_bytes
    from ..compress.weights import compress_weight
    from ..runtime.convert import build_quant_linears
    from ..runtime.cpu_kernels import warm_up_ort
    from ..runtime.memory import heap_in_use
    from ..runtime.packed import PackedLinear

    gen = torch.Generator().manual_seed(1)
    sources, total = {}, 0
    for layer in arch.layers:
        if total > max_bytes:
            break
        # every layer its own weights: ONNX Runtime shares identical initializers of a session
        # (q/k/v, gate/up), which copies of one matrix would be
        w = torch.randn(*layer.shape, generator=gen) * 0.02
        sources[layer.name] = (layer, PackedLinear.from_compressed(compress_weight(w, cfg), cfg))
        total += layer_bytes(*layer.shape, cfg)
    held_as = held_format(next(iter(sources.values()))[1])
    warm_up_ort()
    gc.collect()
    heap0 = heap_in_use()
    packed = {name: PackedLinear([m.clone() for m in source.matrices], cfg)
              for name, (_, source) in sources.items()}
    modules = build_quant_linears(packed)
    del packed
    gc.collect()
    resident = heap_in_use() - heap0
    del modules
    accounted = sum(layer_bytes(*layer.shape, held_as or cfg) for layer, _ in sources.values())
    return HeldBytes(held_as, resident, accounted)


def stack_seconds(cfg: LayerConfig, shapes: list[tuple[int, int]], max_bytes: int = 256 << 20,
                  budget_s: float = 0.5, min_passes: int = 3) -> dict[tuple[int, int], float]:
    """Per matrix shape, the median time of one QuantLinear call (backend auto, one token) as
    a decode step meets it: ``shapes`` in the model's order, each its own copy of the weights,
    so that a matrix's weights have left the caches by the time it runs again (a small matrix
    timed alone in a loop runs from L2/L3 and looks faster than it is). The stack holds up to
    ``max_bytes`` of weights: the whole model when it is that small, else the first blocks."""
    from ..accounting import layer_bytes
    from ..compress.weights import compress_weight
    from ..runtime.modules import QuantLinear
    from ..runtime.packed import PackedLinear

    gen = torch.Generator().manual_seed(0)
    packed = {}
    for shape in shapes:
        if shape not in packed:
            w = torch.randn(*shape, generator=gen) * 0.02
            packed[shape] = PackedLinear.from_compressed(compress_weight(w, cfg), cfg)
    stack, held = [], 0
    for shape in shapes:
        if held > max_bytes:
            break
        copy = PackedLinear([m.clone() for m in packed[shape].matrices], cfg)
        stack.append((shape, QuantLinear(copy)))
        held += layer_bytes(*shape, cfg)
    inputs = {shape[1]: torch.randn(1, 1, shape[1], generator=gen) for shape, _ in stack}
    times: dict[tuple[int, int], list[float]] = {}
    start, passes = time.perf_counter(), 0
    with torch.no_grad():
        for _, module in stack:  # warm-up pass: first calls allocate
            module(inputs[module.in_features])
        while passes < min_passes or time.perf_counter() - start < budget_s:
            for shape, module in stack:
                x = inputs[shape[1]]
                t = time.perf_counter()
                module(x)
                times.setdefault(shape, []).append(time.perf_counter() - t)
            passes += 1
    return {shape: statistics.median(values) for shape, values in times.items()}


def factor_shapes(shapes: list[tuple[int, int]], rank_ratios: tuple[float, ...]
                  ) -> list[tuple[int, int]]:
    """The low-rank factors' shapes of each [out, in] in model order: B [r, in], then A [out, r]
    (the order they run in), for every rank ratio."""
    from ..accounting import rank_for

    out = []
    for ratio in rank_ratios:
        for o, i in shapes:
            r = rank_for(o, i, ratio)
            out += [(r, i), (o, r)]
    return out


def dense_seconds(dtype: torch.dtype, out_features: int, in_features: int) -> float:
    w = (torch.randn(out_features, in_features) * 0.02).to(dtype)
    x = torch.randn(1, 1, in_features).to(dtype)
    return median_seconds(lambda: torch.nn.functional.linear(x, w))


def decode_seconds(model, first_ids: torch.Tensor, n_tokens: int) -> float:
    """Median seconds of a greedy decode step with the KV cache (batch 1), as benchmarks run."""
    times = []
    with torch.no_grad():
        out = model(first_ids, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(n_tokens):
            t = time.perf_counter()
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - t)
    return statistics.median(times[2:] or times)


def block_overhead(arch: Architecture, n_tokens: int = 24) -> tuple[float, float]:
    """(seconds per block outside its linears, seconds per token outside the blocks), from
    decode steps of small random Llama models with the real attention geometry."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = arch.dims
    hidden, vocab = 8 * dims.n_heads, 256  # transformers wants hidden divisible by the heads

    def step_time(n_blocks: int) -> float:
        config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=n_blocks, num_attention_heads=dims.n_heads,
                             num_key_value_heads=dims.n_kv_heads, head_dim=dims.head_dim,
                             vocab_size=vocab, tie_word_embeddings=True)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
        ids = torch.randint(0, vocab, (1, 16))
        return min(decode_seconds(model, ids, n_tokens) for _ in range(2))

    small, large = 2, 8
    t_small, t_large = step_time(small), step_time(large)
    per_block = max(t_large - t_small, 0.0) / (large - small)
    # the small models' own linears are part of that time: take them out
    shapes = [(dims.n_heads * dims.head_dim, hidden), (dims.n_kv_heads * dims.head_dim, hidden),
              (dims.n_kv_heads * dims.head_dim, hidden), (hidden, dims.n_heads * dims.head_dim),
              (2 * hidden, hidden), (2 * hidden, hidden), (hidden, 2 * hidden)]
    linears = sum(dense_seconds(torch.float32, o, i) for o, i in shapes)
    per_block = max(per_block - linears, 0.0)
    per_token = max(t_small - small * (per_block + linears), 0.0)
    return per_block, per_token


@dataclass
class ProfileSettings:
    name: str
    formats: tuple[LayerConfig, ...] = RUNTIME_FORMATS
    # low-rank factors of the quantized dense formats are timed at their own shapes too
    # (A [out, r], B [r, in]); the default space's low-rank options keep half the parameters
    rank_ratios: tuple[float, ...] = (0.5,)
    threads: int | None = None
    copy_bytes: int = 256 << 20  # large enough to leave every cache behind


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_profile(arch: Architecture, settings: ProfileSettings,
                    progress: Callable[[str, float], None] | None = None) -> DeviceProfile:
    """Measure this machine; ``progress(step, fraction_done)`` is called as it goes."""
    from ..accounting import layer_bytes
    from ..runtime.cpu_kernels import DEFAULT_ORT_THREADS

    if settings.threads:
        torch.set_num_threads(settings.threads)
    say = progress or (lambda step, fraction: None)
    head_shape = (arch.dims.vocab, arch.dims.hidden)
    steps = 4 + len(settings.formats) + len(HEAD_DTYPES)
    done = 0

    def tick(step: str) -> None:
        nonlocal done
        done += 1
        say(step, done / steps)

    say("memory bandwidth", 0.0)
    bandwidth = copy_bandwidth(settings.copy_bytes)
    tick("matmul throughput")
    # the packed runtime computes in float32 (16-bit weights are widened, ORT takes int8
    # activations); CPU GEMMs in bf16/f16 without native support are ~100x slower, not a peak
    peaks = {"f32": matmul_tflops(torch.float32)}
    tick("dispatch overhead")
    launch = dispatch_seconds()
    tick("block overhead")
    per_block, per_token = block_overhead(arch)
    tick("layers")

    lookup, achieved, held = [], {}, {}
    shapes = [layer.shape for layer in arch.layers]
    for cfg in settings.formats:
        fmt = layer_format(cfg, "f16")
        if heap_available():
            bytes_held = held_bytes(cfg, arch)
            if bytes_held.resident_bytes > 0:
                held[fmt] = {"resident_ratio": round(bytes_held.resident_ratio, 4)}
                if bytes_held.held_as is not None:
                    held[fmt]["held_as"] = layer_format(bytes_held.held_as, "f16")
        for (out_features, in_features), seconds in stack_seconds(cfg, shapes).items():
            lookup.append({"format": fmt, "group_size": None if cfg.bits == 16 else cfg.group_size,
                           "out_features": out_features, "in_features": in_features,
                           "tokens": 1, "seconds": seconds})
            achieved.setdefault(fmt, []).append(
                layer_bytes(out_features, in_features, cfg) / seconds)
        if cfg.bits < 16 and not cfg.is_pruned and settings.rank_ratios:
            factors = factor_shapes(shapes, settings.rank_ratios)
            for (out_features, in_features), seconds in stack_seconds(cfg, factors).items():
                if (out_features, in_features) not in shapes:
                    lookup.append({"format": fmt, "group_size": cfg.group_size,
                                   "out_features": out_features, "in_features": in_features,
                                   "tokens": 1, "seconds": seconds})
        gc.collect()
        tick(f"layers in {fmt}")
    for name, dtype in HEAD_DTYPES.items():  # the head is larger than any cache: timed alone
        seconds = dense_seconds(dtype, *head_shape)
        lookup.append({"format": name, "out_features": head_shape[0], "in_features": head_shape[1],
                       "tokens": 1, "seconds": seconds})
        achieved.setdefault(name, []).append(
            head_shape[0] * head_shape[1] * dtype.itemsize / seconds)
        tick(f"head {name}")

    def efficiency(fmt: str) -> float:
        return round(min(1.0, statistics.median(achieved[fmt]) / bandwidth), 4)

    # formats with a fast kernel here: those ONNX Runtime's MatMulNBits runs (3/5/6 bits
    # widened to 4/8, sparse ones densified); the others go through the torch unpack path,
    # the profile's fallback
    from ..runtime.cpu_kernels import WIDEN_TO, ort_available

    fast = {"f32", "bf16", "f16"}
    if ort_available():
        fast |= {f"q{b}{sparse}" for b in WIDEN_TO for sparse in ("", "+2:4", "+sparse")}
    formats = {fmt: {"efficiency": efficiency(fmt), **held.get(fmt, {})}
               for fmt in achieved if fmt in fast}
    slow = [efficiency(fmt) for fmt in achieved if fmt not in fast]
    today = datetime.date.today().isoformat()
    where = f"measured by `autocompress profile` on {today} ({cpu_name()}, " \
            f"{torch.get_num_threads()} threads, ORT threads {DEFAULT_ORT_THREADS})"
    total_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    raw = {
        "schema_version": SCHEMA_VERSION,
        "name": settings.name,
        "description": f"{cpu_name()}, {os.cpu_count()} cores, measured with the packed runtime",
        "kind": "cpu",
        "engine": "autocompress packed runtime (torch + ONNX Runtime MatMulNBits)",
        "measured": True,
        "memory": {"capacity": total_memory, "usable_fraction": 0.8,
                   "bandwidth_gbps": round(bandwidth / 1e9, 3),
                   "measured_copy_gbps": round(bandwidth / 1e9, 3)},
        "compute": {"peak_tflops": {k: round(v, 5) for k, v in peaks.items()},
                    "sparse_2_4": False, "float_dtype": "f16"},
        "formats": formats,
        "fallback": {"efficiency": round(statistics.median(slow), 4) if slow else 0.1},
        "overhead": {"launch_us": round(launch * 1e6, 3), "block_us": round(per_block * 1e6, 2),
                     "token_us": round(per_token * 1e6, 2)},
        "lookup": lookup,
        "sources": [{"field": "memory", "note": where + "; capacity from the OS"},
                    {"field": "compute", "note": where + "; 512^3 float32 GEMM"},
                    {"field": "formats", "note": where + "; held_as and resident_ratio: the "
                     "C heap (mallinfo2) before and after building each format's stack"},
                    {"field": "overhead", "note": where + "; block overhead from decode steps "
                     f"of 2- and 8-block models with {arch.name}'s attention geometry"},
                    {"field": "lookup", "note": where + f"; {arch.name}'s layer shapes"}],
    }
    return DeviceProfile.model_validate(raw)
