"""Whole models in packed form: compress + pack every block linear, save, load back.

``pack_model`` compresses a model's block linears as ``compress.apply.compress_model`` does
(same order, same calibration: sequential through the compressed prefix by default) but keeps
each layer's codes, replacing its ``nn.Linear`` by a ``QuantLinear`` that runs from packed
storage. Layers the plan leaves at 16 bits are stored in float16 as well (the accounting's
format), so every block linear is a QuantLinear.

A packed model directory holds:
- ``packed.safetensors``: per layer and matrix i, ``{layer}.{i}.data`` (uint8 bit stream),
  ``.scale`` and ``.zero`` (float16), ``.input_scale`` (awq, float16), and ``{layer}.bias``
  if any; its metadata
  ``autocompress_packed`` is JSON: per layer the LayerConfig and every matrix's shape and layout;
- ``model.safetensors``: every other weight (embeddings, norms, an untied head) as it was;
- ``config.json``, the tokenizer files and ``plan.json``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..compress.apply import compress_layers_into
from ..compress.calibration import InputStats
from ..compress.weights import GPTQSettings
from ..errors import AutocompressError
from ..outputs import publish_dir
from ..model import PACKED_FILE as _PACKED_FILE
from ..model import LayerInfo, LoadedModel, discover_layers
from ..plan import LayerConfig, Plan
from .cpu_kernels import (
    OrtMatMulNBitsGroup,
    OrtMatMulNBitsKernel,
    ort_available,
    ort_ready,
)
from .modules import QuantLinear
from .packed import FP16_MAX, PackedLinear, PackedMatrix

FORMAT_VERSION = 1
PACKED_FILE = _PACKED_FILE  # one name, shared with model.py (which refuses such a directory)
REST_FILE = "model.safetensors"


# -- packing ----------------------------------------------------------------------------------

def pack_layers(model: nn.Module, layers: list[LayerInfo], configs: dict[str, LayerConfig],
                calib_windows: torch.Tensor | None = None, mode: str = "sequential",
                stats: dict[str, InputStats] | None = None, progress: bool = True,
                gptq: GPTQSettings = GPTQSettings()) -> dict[str, PackedLinear]:
    """Compress and pack every layer of ``layers``. ``model`` is compressed in place on the way
    (fake-quant weights, so that sequential calibration sees the compressed prefix)."""
    gguf = [layer.name for layer in layers if configs[layer.name].is_gguf]
    if gguf:
        raise AutocompressError(
            f"{len(gguf)} layer(s) have GGUF types ({gguf[0]}, ...), which run in llama.cpp, not "
            "in the packed runtime: `autocompress export PLAN --format gguf` writes the file")
    packed: dict[str, PackedLinear] = {}

    def keep(layer: LayerInfo, cfg: LayerConfig, compressed) -> None:
        packed[layer.name] = PackedLinear.from_compressed(compressed, cfg)

    compress_layers_into(model, layers, configs, calib_windows, mode, stats, progress, gptq,
                         on_layer=keep)
    return packed


def pack_model(model_or_loaded: nn.Module | LoadedModel, plan: Plan | dict[str, LayerConfig],
               calib_windows: torch.Tensor | None = None, mode: str = "sequential",
               backend: str = "auto", stats: dict[str, InputStats] | None = None,
               keep_packed: bool | None = None, progress: bool = True,
               gptq: GPTQSettings = GPTQSettings()) -> nn.Module:
    """A copy of the model with every block linear compressed by ``plan`` and replaced by a
    QuantLinear running on ``backend`` (the original model is left untouched)."""
    if isinstance(model_or_loaded, LoadedModel):
        source, layers = model_or_loaded.model, model_or_loaded.layers
        if isinstance(plan, Plan):
            plan.check_model(model_or_loaded.identity)
            tables = plan.resolve_model(model_or_loaded).keys() - {l.name for l in layers}
            if tables:
                raise AutocompressError(
                    f"the plan gives {', '.join(sorted(tables))} a GGUF type; the packed runtime "
                    "keeps the embedding in float16: `autocompress export PLAN --format gguf` "
                    "writes the file llama.cpp runs")
    else:
        source, (layers, _) = model_or_loaded, discover_layers(model_or_loaded)
    configs = plan.resolve(layer.name for layer in layers) if isinstance(plan, Plan) else plan
    recovered = plan.recovered_tensors() if isinstance(plan, Plan) else None
    model = copy.deepcopy(source)
    packed = pack_layers(model, layers, configs, calib_windows, mode, stats, progress, gptq)
    if recovered is not None:
        put_recovered(model, packed, recovered)
    install_packed(model, packed, backend, keep_packed)
    return model


def put_recovered(model: nn.Module, packed: dict[str, PackedLinear],
                  recovered: dict[str, torch.Tensor]) -> None:
    """A plan's recovered tensors (compress/recover.py) in its packed layers and the model:
    each scale is float16 already (the stored format); the norms get their trained weights.
    A group whose zero point float16 could not hold keeps the stretched scale it was packed
    with (_float16_grid; near-constant groups, where no scale matters)."""
    from ..compress.recover import put_norms, trainable_parts

    scales = {k[:-len(".scale")]: v for k, v in recovered.items() if k.endswith(".scale")}
    for name, tensor in scales.items():
        matrix = _recovered_matrix(packed, name)
        if tuple(tensor.shape) != tuple(matrix.scale.shape):
            raise AutocompressError(f"the recovered scale of {name} has shape "
                                    f"{tuple(tensor.shape)}, the layer {tuple(matrix.scale.shape)}")
        if matrix.zero is None:
            matrix.scale = tensor.to(matrix.scale)
        else:
            clamped = matrix.zero.float().abs() >= FP16_MAX
            matrix.scale = torch.where(clamped, matrix.scale, tensor.to(matrix.scale))
    put_norms(trainable_parts(model)[1], recovered)


# a low-rank layer's factors as recovery names them (LowRankLinear), and their place in
# PackedLinear.matrices ([A, B]: up, then down)
_FACTOR_INDEX = {"up": 0, "down": 1}


def _recovered_matrix(packed: dict[str, PackedLinear], name: str):
    """The packed matrix a recovered scale named ``name`` goes into: a dense layer's only
    matrix, or one factor of a low-rank layer (``<layer>.up`` / ``<layer>.down``)."""
    parent, _, factor = name.rpartition(".")
    matrix = None
    if name in packed and len(packed[name].matrices) == 1:
        matrix = packed[name].matrices[0]
    elif parent in packed and len(packed[parent].matrices) == 2 and factor in _FACTOR_INDEX:
        matrix = packed[parent].matrices[_FACTOR_INDEX[factor]]
    if matrix is None or matrix.scale is None:
        raise AutocompressError(f"the plan's recovered scale of {name} has no quantized "
                                "layer to go into: recover again for this plan")
    return matrix


def install_packed(model: nn.Module, packed: dict[str, PackedLinear], backend: str = "auto",
                   keep_packed: bool | None = None,
                   biases: dict[str, torch.Tensor] | None = None,
                   ort_threads: int | None = None, share_inputs: bool = True) -> None:
    """Replace each named ``nn.Linear`` (or placeholder) of ``model`` by a QuantLinear.
    ``share_inputs``: layers that read one tensor (q/k/v, gate/up) and run on ONNX Runtime
    share one session, run once per input."""
    if biases is None:
        biases = {name: getattr(model.get_submodule(name), "bias", None) for name in packed}
    modules = build_quant_linears(packed, backend, keep_packed, biases, ort_threads, share_inputs)
    for name, module in modules.items():
        _set_submodule(model, name, module)


def build_quant_linears(packed: dict[str, PackedLinear], backend: str = "auto",
                        keep_packed: bool | None = None,
                        biases: dict[str, torch.Tensor | None] | None = None,
                        ort_threads: int | None = None, share_inputs: bool = True
                        ) -> dict[str, QuantLinear]:
    """The QuantLinear of every named packed layer, as ``install_packed`` puts them in a model
    (sessions shared between layers that read one input)."""
    shared = _shared_ort_kernels(packed, backend, ort_threads) if share_inputs else {}
    biases = biases or {}
    return {name: QuantLinear(layer, biases.get(name), backend, name, keep_packed, ort_threads,
                              [shared[name]] if name in shared else None)
            for name, layer in packed.items()}


# Llama-style projections that read the same tensor inside their parent module
SHARED_INPUT = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in",
                "gate_proj": "mlp_in", "up_proj": "mlp_in"}


def _shared_ort_kernels(packed: dict[str, PackedLinear], backend: str,
                        ort_threads: int | None) -> dict[str, OrtMatMulNBitsKernel]:
    """ORT kernels of the layers that share an input, grouped into one session each."""
    if backend not in ("auto", "ort") or not ort_available():
        return {}
    by_input: dict[tuple[str, str], list[str]] = {}
    for name, layer in packed.items():
        parent, _, child = name.rpartition(".")
        matrix = layer.matrices[0]
        if child not in SHARED_INPUT or len(layer.matrices) != 1 or matrix.data.is_cuda:
            continue
        ready = ort_ready(matrix, widen=backend == "auto")
        if ready is not None:
            by_input.setdefault((parent, SHARED_INPUT[child]), []).append((name, ready))
    kernels = {}
    for members in by_input.values():
        if len(members) < 2:
            continue
        group = OrtMatMulNBitsGroup([ready for _, ready in members], threads=ort_threads)
        for index, (name, _) in enumerate(members):
            kernels[name] = OrtMatMulNBitsKernel(group=group, index=index)
    return kernels


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# -- saving -----------------------------------------------------------------------------------

def save_packed(model: nn.Module, out: str | Path, plan: Plan | None = None,
                tokenizer: Any = None, force: bool = False, log=None) -> Path:
    """Write ``model`` (with QuantLinear layers) as a packed model directory, atomically."""
    out = Path(out)
    layers = quant_linears(model)
    if not layers:
        raise AutocompressError("the model has no packed layers: pack it first (pack_model)")
    tensors, described = {}, {}
    for name, module in layers.items():
        if module.packed is None:
            raise AutocompressError(
                f"layer {name} runs on ONNX Runtime and no longer holds its packed weights; "
                "pack with keep_packed=True (or backend 'torch') to save")
        described[name] = _describe(module.packed)
        for i, matrix in enumerate(module.packed.matrices):
            for field in ("data", "scale", "zero", "input_scale"):
                value = getattr(matrix, field)
                if value is not None:
                    tensors[f"{name}.{i}.{field}"] = value.detach().cpu().contiguous()
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias.detach().cpu().contiguous()
    def fill(tmp: Path) -> None:
        meta = {"format_version": FORMAT_VERSION, "layers": described}
        save_file(tensors, str(tmp / PACKED_FILE),
                  metadata={"autocompress_packed": json.dumps(meta)})
        save_file(_rest_state(model, layers), str(tmp / REST_FILE), metadata={"format": "pt"})
        config = getattr(model, "config", None)
        if config is not None:
            (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if plan is not None:
            (tmp / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
            if plan.recovery is not None:  # the plan beside it names them
                plan.recovered_tensors()  # checked against the record first
                name = plan.recovery.tensors
                (tmp / name).write_bytes((plan.directory / name).read_bytes())

    return publish_dir(out, "apply", fill, force=force, log=log)


def _describe(packed: PackedLinear) -> dict[str, Any]:
    return {"config": packed.config.to_dict(),
            "matrices": [dict(out_features=m.out_features, in_features=m.in_features,
                              bits=m.bits, group_size=m.group_size, sym=m.sym, layout=m.layout,
                              n_kept=m.n_kept) for m in packed.matrices]}


def _rest_state(model: nn.Module, layers: dict[str, QuantLinear]) -> dict[str, torch.Tensor]:
    """Every tensor outside the packed layers; a head tied to the embeddings is left out."""
    state = {}
    for key, value in model.state_dict().items():
        if any(key.startswith(name + ".") for name in layers):
            continue
        state[key] = value
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    seen: dict[int, str] = {}
    out = {}
    for key, value in state.items():  # safetensors refuses shared storage: keep one name
        if value.data_ptr() in seen and value.numel():
            continue
        seen[value.data_ptr()] = key
        out[key] = value.detach().cpu().contiguous()
    return out


# -- loading ----------------------------------------------------------------------------------

@dataclass
class PackedModel:
    model: nn.Module
    tokenizer: Any
    plan: Plan | None
    directory: Path


def load_packed_layers(directory: str | Path) -> tuple[dict[str, PackedLinear],
                                                       dict[str, torch.Tensor]]:
    """(packed layers, biases) from a packed model directory's packed.safetensors."""
    path = Path(directory) / PACKED_FILE
    if not path.is_file():
        raise AutocompressError(f"{str(directory)!r} is not a packed model directory "
                                f"(no {PACKED_FILE}); write one with 'autocompress apply --packed'")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("autocompress_packed", "null") or "null")
        if not meta or meta.get("format_version") != FORMAT_VERSION:
            raise AutocompressError(f"{str(path)!r} has no packed-format metadata this version "
                                    f"reads (format_version {FORMAT_VERSION})")
        keys = set(f.keys())

        def get(key: str) -> torch.Tensor | None:
            # a copy in process memory, not a view of the mapped file: the layers then hold
            # what they measure, and the directory may be rewritten while they run
            return f.get_tensor(key).clone() if key in keys else None

        layers, biases = {}, {}
        for name, desc in meta["layers"].items():
            matrices = [PackedMatrix(**m, data=get(f"{name}.{i}.data"),
                                     scale=get(f"{name}.{i}.scale"), zero=get(f"{name}.{i}.zero"),
                                     input_scale=get(f"{name}.{i}.input_scale"))
                        for i, m in enumerate(desc["matrices"])]
            layers[name] = PackedLinear(matrices, LayerConfig.from_dict(desc["config"]))
            bias = get(f"{name}.bias")
            if bias is not None:
                biases[name] = bias
    return layers, biases


def load_packed(directory: str | Path, backend: str = "auto", dtype: torch.dtype = torch.float32,
                keep_packed: bool | None = None) -> PackedModel:
    """Rebuild a packed model directory's model: the packed layers as QuantLinear on
    ``backend``, every other weight from model.safetensors (cast to ``dtype``)."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    layers, biases = load_packed_layers(directory)
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    with init_empty_weights(include_buffers=False):  # no float copy of what is packed
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    install_packed(model, layers, backend, keep_packed, biases)
    rest = {k: v.to(dtype) if v.is_floating_point() else v
            for k, v in load_file(str(directory / REST_FILE)).items()}
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    if unexpected:
        raise AutocompressError(f"{directory}: weights the model does not have: {unexpected[:3]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise AutocompressError(f"{directory}: weights missing from {REST_FILE}: {still_meta[:3]}")
    model.eval()
    model.requires_grad_(False)
    tokenizer = None
    if (directory / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    plan = Plan.load(directory / "plan.json") if (directory / "plan.json").is_file() else None
    return PackedModel(model, tokenizer, plan, directory)


# -- the CLI's entry point --------------------------------------------------------------------

def apply_packed(loaded: LoadedModel, plan: Plan, out: str | Path,
                 calib_windows: torch.Tensor | None = None, mode: str = "sequential",
                 progress: bool = True, gptq: GPTQSettings = GPTQSettings(),
                 force: bool = False, log=None) -> dict[str, int]:
    """``autocompress apply --packed``: compress ``loaded`` by ``plan``, write the packed model
    directory ``out``; return its byte counts (packed layers, and the plan's accounting)."""
    from ..accounting import layer_bytes

    model = pack_model(loaded, plan, calib_windows, mode=mode, backend="torch", progress=progress,
                       gptq=gptq)
    save_packed(model, out, plan, loaded.tokenizer, force=force, log=log)
    configs = plan.resolve(layer.name for layer in loaded.layers)
    return {"packed_layer_bytes": sum(m.packed.nbytes() for m in quant_linears(model).values()),
            "accounted_layer_bytes": sum(layer_bytes(*layer.shape, configs[layer.name])
                                         for layer in loaded.layers)}
