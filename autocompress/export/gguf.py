"""``autocompress export PLAN --format gguf``: the plan's model as a GGUF file llama.cpp runs.

Every block linear, the token embedding and an untied head are written in their plan type as
the plan's build made them (the bytes llama.cpp's quantizer returned during the build, so the
file is the model ``eval`` measured, not a second quantization); float16 entries are written
as f16. Everything else (metadata, tokenizer, norms, biases, rope tables) is copied from the
source GGUF the model was loaded from; a model loaded from a Hugging Face Llama directory gets
them from its config and tokenizer instead (hf_source.py). q and k rows go back into
llama.cpp's order (gguf_layout.py); GGUF quantizes row by row, so reordering the bytes is
exact.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..compress.gguf import GGUFWeight
from ..errors import AutocompressError
from ..gguf_types import GGUF_BY_GGML, GGUF_TYPES
from ..io_utils import current_umask
from ..gguf_source import gguf_path, read_gguf
from ..model import LayerInfo, LoadedModel
from ..plan import Plan
from .gguf_layout import gguf_name, to_gguf_rows
from .hf_source import ARCH, Field, hf_fields, hf_tensors

PLAN_KEY = "autocompress.plan"  # the plan's label, and how `export` recognises its own files
PERMUTED_ARCHS = (ARCH,)  # transformers' LlamaTensorProcessor: the ones it reorders back
# llama.cpp's LLAMA_FTYPE for a file whose block linears are mostly of one type (shown by
# llama.cpp when it loads the file; it does not decide how tensors are read)
_FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9,
               "q2_k": 10, "q3_k": 12, "q4_k": 15, "q5_k": 17, "q6_k": 18, "iq4_nl": 25,
               "iq4_xs": 30, "bf16": 32}
_GUESSED = 1024  # LLAMA_FTYPE_GUESSED: a mixture chosen per tensor


@dataclass
class GGUFExport:
    path: Path
    file_bytes: int
    types: dict[str, int]  # GGUF type -> number of tensors written in it
    planned_bytes: int  # bytes of the plan's entries (block linears, embedding, head)


def source_gguf(loaded: LoadedModel) -> Path | None:
    """The GGUF the model was loaded from, whose metadata and tokenizer the export carries;
    None for a Hugging Face directory, whose config and tokenizer are checked now (one line
    for what this export cannot write)."""
    path = gguf_path(loaded)
    if path is None:
        hf_fields(loaded)
    return path


@dataclass
class _Source:
    """What the file carries besides the plan's entries: the architecture, the metadata, and
    every tensor in file order (data and GGML type; None for the plan's own entries)."""
    arch: str
    fields: list[Field]
    tensors: list[tuple[str, np.ndarray | None, int | None]]


def _source(loaded: LoadedModel, path: Path | None) -> _Source:
    from gguf import GGMLQuantizationType, GGUFValueType

    if path is None:
        return _Source(ARCH, hf_fields(loaded), [
            (name, data, None if data is None else int(GGMLQuantizationType.F32))
            for name, data in hf_tensors(loaded)])
    reader = read_gguf(path)
    fields = [Field(f.name, f.contents(), f.types[0],
                    f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None)
              for f in reader.fields.values()
              if not f.name.startswith("GGUF.") and f.name != "general.architecture"]
    return _Source(reader.fields["general.architecture"].contents(), fields,
                   [(t.name, t.data, int(t.tensor_type)) for t in reader.tensors])


def check_exportable(plan: Plan, loaded: LoadedModel) -> None:
    """One line naming the layers whose formats have no GGUF type."""
    bad: dict[str, list[str]] = {}
    for layer in loaded.layers:
        cfg = plan.config_for(layer.name)
        if not (cfg.is_gguf or cfg.is_identity):
            bad.setdefault(cfg.short(), []).append(layer.name)
    if bad:
        count = sum(len(names) for names in bad.values())
        shown = "; ".join(f"{label}: {names[0]}" + (f" (+{len(names) - 1})" if len(names) > 1
                                                     else "") for label, names in bad.items())
        raise AutocompressError(
            f"{count} layer(s) have formats with no GGUF type ({shown}); GGUF stores dense "
            "matrices in llama.cpp's types: make the plan with them (plan --gguf TYPE, or "
            "search --space gguf)")


def export_gguf(loaded: LoadedModel, plan: Plan, out: str | Path, recipe=None,
                progress: bool = True) -> GGUFExport:
    """Build ``plan`` on ``loaded`` (as its provenance says) and write the GGUF ``out``
    atomically (a temporary file beside it, then a rename)."""
    from ..compress.apply import compressed_in_place
    from ..compress.reproduce import build_recipe

    check_exportable(plan, loaded)
    source = source_gguf(loaded)
    recipe = recipe or build_recipe(loaded, plan)
    carried = _source(loaded, source)
    written: dict[str, tuple[np.ndarray, str]] = {}  # gguf name -> (bytes [rows, row], type)
    # only llama-architecture GGUFs hold q/k rows in llama.cpp's interleaved rotary order (its
    # converter reorders them, and transformers undoes that on loading); qwen2 and the other
    # NeoX-rotary architectures keep Hugging Face's order
    heads = _heads(loaded) if carried.arch in PERMUTED_ARCHS else None

    def keep(info: LayerInfo, cfg, compressed) -> None:
        stored = compressed.quantized[0]
        if isinstance(stored, GGUFWeight):
            data, type_name = stored.data, stored.type.name
        else:  # float16, as the torch build rounded it
            data = compressed.factors[0].cpu().numpy().astype(np.float16).view(np.uint8)
            type_name = "f16"
        hf = f"{info.name}.weight"
        written[gguf_name(hf)] = (data if heads is None else to_gguf_rows(hf, data, *heads),
                                  type_name)

    with compressed_in_place(loaded, plan, recipe.calib, mode=recipe.mode, gptq=recipe.gptq,
                             progress=progress, on_layer=keep,
                             copy_source=recipe.provenance.gguf_source_copy):
        pass  # ``keep`` has every tensor; the model is restored for the tables below
    model = loaded.model
    for table in loaded.tables:  # float16 entries are not built: the model's weights as they are
        name = gguf_name(f"{table.name}.weight")
        if name not in written:
            weight = model.get_submodule(table.name).weight.detach().float().cpu().numpy()
            written[name] = (weight.astype(np.float16).view(np.uint8), "f16")

    missing = sorted(set(written) - {name for name, _, _ in carried.tensors}
                     - {gguf_name("lm_head.weight")})
    if missing:
        raise AutocompressError(f"the source GGUF {source} has no tensor {missing[0]}: it is "
                                "not the file this model was loaded from")
    path = Path(out)
    tmp = Path(tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)[1])
    try:
        types = _write(carried, written, plan, tmp, progress)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    planned = sum(int(data.nbytes) for data, _ in written.values())
    return GGUFExport(path, path.stat().st_size, dict(types), planned)


def _write(source: _Source, written, plan: Plan, path: Path, progress: bool) -> Counter:
    from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

    writer = GGUFWriter(path, source.arch)
    block_types = Counter(t for name, (_, t) in written.items() if name.startswith("blk."))
    main = block_types.most_common(1)[0][0] if block_types else "f16"
    for field in source.fields:
        if field.name not in ("general.file_type", PLAN_KEY):
            writer.add_key_value(field.name, field.value, field.type, sub_type=field.sub_type)
    mixed = len(block_types) > 1
    writer.add_key_value("general.file_type", _FILE_TYPES.get(main, 1) | (_GUESSED if mixed
                                                                          else 0),
                         GGUFValueType.UINT32)
    writer.add_key_value(PLAN_KEY, plan.figures.get("label") or plan.default.short(),
                         GGUFValueType.STRING)
    types: Counter = Counter()
    tensors = list(source.tensors)
    if "output.weight" in written and all(name != "output.weight" for name, _, _ in tensors):
        tensors.append(("output.weight", None, None))  # an untied head the source stored elsewhere
    for name, data, ggml_type in tensors:
        if name in written:
            data, type_name = written[name]
            ggml = GGMLQuantizationType(GGUF_TYPES[type_name].ggml)
        else:
            ggml = GGMLQuantizationType(ggml_type)
            data = np.asarray(data)
            type_name = GGUF_BY_GGML[int(ggml)].name if int(ggml) in GGUF_BY_GGML else ggml.name
            if ggml in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                writer.add_tensor(name, data)
                types[type_name] += 1
                continue
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.uint8), raw_dtype=ggml)
        types[type_name] += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=progress)
    writer.close()
    return types


def _heads(loaded: LoadedModel) -> tuple[int, int]:
    config = loaded.config
    heads = config.num_attention_heads
    return heads, getattr(config, "num_key_value_heads", None) or heads


def is_our_gguf(path: Path) -> bool:
    """``is_ours`` for ``--out``: a GGUF that an earlier export wrote (it carries PLAN_KEY)."""
    try:
        from gguf import GGUFReader

        return PLAN_KEY in GGUFReader(path).fields
    except Exception:  # not a GGUF at all, or a damaged one: not ours to overwrite
        return False
