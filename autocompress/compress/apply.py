"""Apply a plan to a model: every block linear compressed by its LayerConfig (fake-quant).

The result is an ordinary float model whose weights hold the dequantized values (and, for
low-rank layers, two stacked linears), which is what quality evaluation needs. Packed storage
and fast kernels live in runtime/.

Calibration: RTN and magnitude pruning need none. GPTQ and Wanda need each layer's input
statistics; by default they are taken *sequentially*, block by block through the already
compressed prefix (as GPTQ's reference code does); ``mode="parallel"`` takes them all from the
uncompressed model in one pass (faster, and reusable across plans via ``stats=``).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import AutocompressError
from ..model import LayerInfo, LoadedModel
from ..plan import LayerConfig, Plan, check_table
from ..residency import release
from .awq import search_input_scale
from .calibration import BlockRunner, InputStats, collect_stats, sequential
from .codes_linear import CodesLinear
from .memo import for_memo, from_memo, worth_keeping
from .quant import QuantizedWeight
from .rounding_cache import RoundingCache, rounding_cache_for
from .signround import LearnedGrid, SignRound
from .weights import CompressedLayer, GPTQSettings, LayerStats, compress_weight

if TYPE_CHECKING:
    from ..gguf_source import SourceTensors


class LowRankLinear(nn.Module):
    """y = A (B x) + bias: a linear layer stored as two factors, ``down`` (B) then ``up`` (A)."""

    def __init__(self, down: nn.Module, up: nn.Module):
        super().__init__()
        self.down, self.up = down, up
        self.in_features, self.out_features = down.in_features, up.out_features

    @classmethod
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None,
                     dtype) -> "LowRankLinear":
        """The factors' decoded values in two ``nn.Linear``."""
        down = nn.Linear(b.shape[1], b.shape[0], bias=False, dtype=dtype, device=b.device)
        up = nn.Linear(a.shape[1], a.shape[0], bias=bias is not None, dtype=dtype,
                       device=a.device)
        with torch.no_grad():
            down.weight.copy_(b)
            up.weight.copy_(a)
            if bias is not None:
                up.bias.copy_(bias)
        return cls(down, up)

    @classmethod
    def from_codes(cls, a: QuantizedWeight, b: QuantizedWeight, bias: torch.Tensor | None,
                   dtype, pack: bool = True) -> "LowRankLinear":
        """Both factors held as their codes (``CodesLinear``): the same outputs, and the
        factors' scales are then what distillation recovery trains, as for a dense layer."""
        return cls(CodesLinear(b, None, dtype, pack=pack), CodesLinear(a, bias, dtype, pack=pack))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def needs_calibration(configs: Iterable[LayerConfig]) -> bool:
    """GPTQ, Wanda, AWQ and llama.cpp's imatrix cannot run without input statistics, nor
    learned rounding without the blocks' inputs."""
    return any(cfg.method == "gptq" and cfg.bits < 16 or cfg.learns_rounding
               or cfg.method == "imatrix" or cfg.awq
               or (cfg.is_pruned and cfg.prune_method == "wanda") for cfg in configs)


def uses_calibration(configs: Iterable[LayerConfig]) -> bool:
    """Also true for low rank, which whitens by the input statistics when it has them, and for
    clipped grids, which weigh each column's error by its input's mean x²."""
    configs = list(configs)
    return needs_calibration(configs) or any(cfg.is_low_rank or (cfg.clip and cfg.bits < 16)
                                             for cfg in configs)


def needs_hessian(cfg: LayerConfig) -> bool:
    """GPTQ and the whitened low-rank factorisation read the whole E[x xᵀ]; imatrix and Wanda
    only its diagonal."""
    return cfg.method == "gptq" and cfg.bits < 16 or cfg.is_low_rank


def hessian_layers(layers: Iterable[LayerInfo], options: Callable[[LayerInfo], Iterable[LayerConfig]]
                   ) -> set[str]:
    """Names of the layers any of whose configs (``options(layer)``) needs the full E[x xᵀ]."""
    return {layer.name for layer in layers if any(map(needs_hessian, options(layer)))}


def layer_stats(stats: InputStats | None) -> LayerStats | None:
    """What the operators read of one layer's calibration statistics."""
    if stats is None:
        return None
    return LayerStats(H=stats.hessian, act_norm=stats.act_norm, n_samples=stats.n_samples,
                      mean_square=stats.mean_square)


def _stored(source: SourceTensors | None, name: str, cfg: LayerConfig):
    """The source GGUF's bytes of layer ``name`` where ``cfg`` is a GGUF type (else None)."""
    return source.stored(name) if source is not None and cfg.is_gguf else None


def _swap_in(param: nn.Parameter, value: torch.Tensor) -> None:
    """Give ``param`` a new tensor rather than writing into its own: the tensor it had is left
    as it was, for whoever keeps it (``compressed_in_place`` restores it); a parameter shared by
    two modules (a tied head) stays shared."""
    param.data = value.to(param.dtype, copy=True)


def _holds_codes(compressed: CompressedLayer) -> bool:
    """Every matrix (the dense weight, or both low-rank factors) quantized to RTN/GPTQ codes,
    which ``CodesLinear`` can compute from."""
    return all(isinstance(q, QuantizedWeight) for q in compressed.quantized)


def _install(model: nn.Module, name: str, compressed: CompressedLayer,
             codes: bool = False, shared: bool = False) -> None:
    """Put ``compressed`` in the place of layer ``name``; ``codes``: a quantized dense layer
    is held as its codes (``CodesLinear``) instead of its decoded float weight. The weight it
    replaces is released (residency.py) where it is a view of the model's file, so that a
    plan in place holds its own weights, not the originals beside them."""
    module = model.get_submodule(name)
    dtype = module.weight.dtype
    release([module.weight.data])
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if codes and _holds_codes(compressed):  # ``shared``: a memo keeps these codes too
        if len(compressed.quantized) == 1:
            setattr(parent, child, CodesLinear(compressed.quantized[0], module.bias, dtype,
                                               pack=not shared))
        else:
            a, b = compressed.quantized
            setattr(parent, child, LowRankLinear.from_codes(a, b, module.bias, dtype,
                                                            pack=not shared))
        return
    compressed = from_memo(compressed)  # decoded where a memo kept only the codes
    if len(compressed.factors) == 1:
        _swap_in(module.weight, compressed.factors[0])
        return
    a, b = compressed.factors
    setattr(parent, child, LowRankLinear.from_factors(a, b, module.bias, dtype))


OnLayer = Callable[[LayerInfo, LayerConfig, CompressedLayer], None]


def _compress_layers(model: nn.Module, layers: list[LayerInfo], configs: dict[str, LayerConfig],
                     stats: dict[str, InputStats] | None, gptq: GPTQSettings,
                     on_layer: OnLayer | None, memo: dict | None = None,
                     source: SourceTensors | None = None, codes: bool = False) -> None:
    for layer in layers:
        cfg = configs[layer.name]
        key = (layer.name, cfg)
        if memo is not None and key in memo:
            compressed = memo[key]
            if on_layer is not None or not (codes and _holds_codes(compressed)):
                compressed = from_memo(compressed)
        else:
            weight = model.get_submodule(layer.name).weight.detach().float()
            # only the operators that read statistics fetch them (a StatsStore reads a file)
            weight_stats = layer_stats(stats.get(layer.name)) \
                if stats is not None and uses_calibration([cfg]) else None
            # identity configs come back rounded to float16, as deployment stores them
            compressed = compress_weight(weight, cfg, weight_stats, gptq,
                                         _stored(source, layer.name, cfg))
            if memo is not None and worth_keeping(cfg):
                memo[key] = for_memo(compressed)
        if on_layer is not None:
            on_layer(layer, cfg, compressed)
        _install(model, layer.name, compressed, codes, shared=memo is not None and key in memo)


def _learn_rounding(model: nn.Module, runner: BlockRunner, index: int, layers: list[LayerInfo],
                    configs: dict[str, LayerConfig], targets: list[torch.Tensor] | None,
                    on_layer: OnLayer | None, codes: bool,
                    cache: RoundingCache | None = None,
                    quantized: dict[str, QuantizedWeight] | None = None,
                    stats: dict[str, InputStats] | None = None) -> None:
    """Learned rounding of ``layers`` (all in block ``index``), the block's other layers
    already compressed: their output error is part of what the rounding makes up for.
    ``quantized``: the block's tuned weights as a cache gave them (nothing is tuned, and
    ``targets`` may be None); else they are tuned and written to ``cache``. ``stats``: the
    block's input statistics, from which an AWQ layer's input scale is searched first."""
    if quantized is None:
        block = runner.blocks[index]
        relative = {id(module): name for name, module in block.named_modules()}
        inside = {layer.name: relative[id(model.get_submodule(layer.name))] for layer in layers}
        grids = {}
        for layer in layers:
            cfg, name = configs[layer.name], inside[layer.name]
            weight = block.get_submodule(name).weight.detach()
            input_scale = None
            if cfg.awq:  # s as for RTN's min/max grid, the one the tuning starts from
                input_scale, _ = search_input_scale(
                    weight.float(), layer_stats((stats or {}).get(layer.name)), cfg.bits,
                    cfg.group_size, cfg.sym)
            grids[name] = LearnedGrid(weight, cfg.bits, cfg.group_size, cfg.sym, input_scale)
        tuner = SignRound(block, grids)
        tuner.tune(runner.hidden, runner.kwargs, targets)
        tuned = tuner.quantized()
        quantized = {layer.name: tuned[inside[layer.name]] for layer in layers}
        if cache is not None:
            cache.put(index, quantized)
    for layer in layers:
        qw = quantized[layer.name]
        compressed = CompressedLayer([qw.dequantize()], [None], [qw])
        if on_layer is not None:
            on_layer(layer, configs[layer.name], compressed)
        _install(model, layer.name, compressed, codes)


def compress_layers_into(model: nn.Module, layers: list[LayerInfo],
                         configs: dict[str, LayerConfig],
                         calib_windows: torch.Tensor | None = None, mode: str = "sequential",
                         stats: dict[str, InputStats] | None = None, progress: bool = True,
                         gptq: GPTQSettings = GPTQSettings(),
                         on_layer: OnLayer | None = None, memo: dict | None = None,
                         source: SourceTensors | None = None, codes: bool = False,
                         rounding_cache: RoundingCache | None = None) -> None:
    """Compress ``layers`` of ``model`` in place; ``on_layer`` sees every compressed layer
    (the packed runtime builds its storage from it). ``memo`` (parallel mode with fixed
    ``stats`` only) keeps expensive per-(layer, config) results across calls, for callers that
    measure many plans. ``source``: the GGUF the weights were loaded from, whose tensors are
    kept where a layer's GGUF type is the one they are stored in (gguf_source.py).
    ``codes``: RTN/GPTQ layers are held as their codes (``CodesLinear``: the same outputs,
    a quarter of the memory), for callers that only run the model. ``rounding_cache``: where
    learned rounding keeps each tuned block (rounding_cache.py), so that a build resumes."""
    if memo is not None and (stats is None or mode != "parallel"):
        raise ValueError("memo needs fixed stats and parallel mode: results must not depend on "
                         "the rest of the plan")
    missing = [layer.name for layer in layers if layer.name not in configs]
    if missing:
        raise AutocompressError(f"no config for layer(s) {missing[:3]}")
    if mode not in ("sequential", "parallel"):
        raise AutocompressError(f"unknown calibration mode {mode!r}: use sequential or parallel")
    active = [layer for layer in layers if not configs[layer.name].is_identity]
    identity = [layer for layer in layers if configs[layer.name].is_identity]
    active_configs = [configs[layer.name] for layer in active]
    if needs_calibration(active_configs) and stats is None and calib_windows is None:
        raise AutocompressError(
            "this plan uses GPTQ or Wanda, which need calibration text (--calib-text, or the "
            "default corpus)"
        )
    calibrate = uses_calibration(active_configs) and (stats is not None or calib_windows is not None)
    if any(cfg.learns_rounding for cfg in active_configs) and (stats is not None or mode == "parallel"
                                                     or calib_windows is None):
        raise AutocompressError("method signround tunes each block on the block's own inputs: "
                                "it needs sequential calibration on calibration windows")
    full = hessian_layers(active, lambda layer: [configs[layer.name]])
    if not calibrate or stats is not None or mode == "parallel":
        if calibrate and stats is None:
            stats = collect_stats(model, active, calib_windows, progress=progress,
                                  hessian_layers=full)
        for layer in tqdm(layers, desc="compress", disable=not progress, leave=False):
            _compress_layers(model, [layer], configs, stats, gptq, on_layer, memo, source,
                             codes)
        return
    # sequential: float16 layers first, then block by block through the compressed prefix
    _compress_layers(model, identity, configs, None, gptq, on_layer, codes=codes)

    def compress_block(index: int, block_stats: dict[str, InputStats],
                       runner: BlockRunner) -> None:
        block_layers = [l for l in active if l.name in block_stats]
        learned = [l for l in block_layers if configs[l.name].learns_rounding]
        cached = None if not learned or rounding_cache is None else \
            rounding_cache.get(index, [l.name for l in learned])
        # the tuning's target: the block's output while it is still uncompressed
        targets = runner.outputs(index) if learned and cached is None else None
        _compress_layers(model, [l for l in block_layers if l not in learned], configs,
                         block_stats, gptq, on_layer, source=source, codes=codes)
        if learned:
            _learn_rounding(model, runner, index, learned, configs, targets, on_layer, codes,
                            rounding_cache, cached, block_stats)

    sequential(model, active, calib_windows, compress_block, progress=progress,
               hessian_layers=full)


def compress_model(loaded: LoadedModel, plan: Plan | dict[str, LayerConfig],
                   calib_windows: torch.Tensor | None = None, mode: str = "sequential",
                   stats: dict[str, InputStats] | None = None, progress: bool = True,
                   gptq: GPTQSettings = GPTQSettings(),
                   on_layer: OnLayer | None = None, memo: dict | None = None,
                   copy_source: bool = True) -> nn.Module:
    """A compressed copy of ``loaded.model`` (the original is left untouched).
    ``copy_source``: keep the source GGUF's tensors where a layer's type is theirs, as
    llama-quantize does (False: quantize them again, as plans that do not record
    ``gguf_source_copy`` were built)."""
    model = copy.deepcopy(loaded.model)
    _compress_all(model, loaded, plan, calib_windows, mode, stats, progress, gptq, on_layer,
                  memo, copy_source, codes=False)
    return model


IN_PLACE = "_autocompress_in_place"  # set on a model while it holds a plan in place


@contextmanager
def compressed_in_place(loaded: LoadedModel, plan: Plan | dict[str, LayerConfig],
                        calib_windows: torch.Tensor | None = None, mode: str = "sequential",
                        stats: dict[str, InputStats] | None = None, progress: bool = True,
                        gptq: GPTQSettings = GPTQSettings(), on_layer: OnLayer | None = None,
                        memo: dict | None = None, copy_source: bool = True,
                        codes: bool = False) -> Iterator[nn.Module]:
    """``loaded.model`` itself, compressed as ``compress_model`` would build its copy, for the
    duration of the block; restored exactly when it ends, however it ends. A candidate then
    costs the memory of its new weights only, not of a copy of the whole model (the embedding
    is a fifth of SmolLM2 and a sixth of Qwen2.5-1.5B). Nothing is copied to restore: layers
    get new tensors (``_swap_in``), the original ones are kept and put back, and a layer that
    became low rank gets its original module back. Not reentrant: one plan at a time.
    ``codes``: quantized layers held as codes (``CodesLinear``), for meters that only run the
    model; the weights they replace are released from memory where they are views of the
    model's file, and read in again when next used (residency.py)."""
    model = loaded.model
    if getattr(model, IN_PLACE, False):
        raise RuntimeError("the model is already compressed in place: one plan at a time")
    kept = [(param, param.data) for param in model.parameters()]
    modules = {layer.name: model.get_submodule(layer.name) for layer in loaded.layers}
    setattr(model, IN_PLACE, True)
    try:
        _compress_all(model, loaded, plan, calib_windows, mode, stats, progress, gptq, on_layer,
                      memo, copy_source, codes)
        yield model
    finally:
        for name, module in modules.items():
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
        for param, data in kept:
            param.data = data
        setattr(model, IN_PLACE, False)


def _compress_all(model: nn.Module, loaded: LoadedModel, plan, calib_windows, mode, stats,
                  progress, gptq, on_layer, memo, copy_source, codes) -> None:
    from ..gguf_source import source_tensors

    configs = plan.resolve_model(loaded) if isinstance(plan, Plan) else plan
    source = source_tensors(loaded) if copy_source else None
    learns = calib_windows is not None and mode == "sequential" and stats is None and \
        any(configs[layer.name].learns_rounding for layer in loaded.layers if layer.name in configs)
    cache = rounding_cache_for(loaded, configs, calib_windows, gptq) if learns else None
    compress_layers_into(model, loaded.layers, configs, calib_windows, mode, stats, progress,
                         gptq, on_layer, memo, source, codes, cache)
    compress_tables_into(model, loaded.tables, configs, on_layer, source)


def compress_tables_into(model: nn.Module, tables: list[LayerInfo],
                         configs: dict[str, LayerConfig], on_layer: OnLayer | None = None,
                         source: SourceTensors | None = None) -> None:
    """The embedding (and an untied head) at their configs, where ``configs`` gives one: a
    tied head follows the embedding, as llama.cpp reads ``token_embd`` for both."""
    for table in tables:
        cfg = configs.get(table.name)
        if cfg is None or cfg.is_identity:
            continue
        check_table(cfg)
        weight = model.get_submodule(table.name).weight
        compressed = compress_weight(weight.detach().float(), cfg,
                                     source=_stored(source, table.name, cfg))
        if on_layer is not None:
            on_layer(table, cfg, compressed)
        _swap_in(weight, compressed.factors[0])
