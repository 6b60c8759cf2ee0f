"""Write a compressed (fake-quant) model as a Hugging Face directory.

The weights are the dequantized values in float16, so any HF tool can load and evaluate the
result; low-rank layers are multiplied back to one dense matrix for that reason. The plan is
written beside them. Packed low-bit storage is the runtime's job (``apply --packed``, later).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..compress.apply import LowRankLinear
from ..model import LoadedModel
from ..outputs import publish_dir
from ..plan import Plan


def dense_state_dict(model: nn.Module, loaded: LoadedModel) -> dict[str, torch.Tensor]:
    """Float16 state dict in the original layout: low-rank layers folded back to one weight,
    layers held as codes decoded."""
    from ..compress.codes_linear import CodesLinear

    low_rank = {layer.name: model.get_submodule(layer.name) for layer in loaded.layers
                if isinstance(model.get_submodule(layer.name), LowRankLinear)}
    state = {k: v for k, v in model.state_dict().items()
             if k.rpartition(".")[0].rpartition(".")[0] not in low_rank}
    for name, module in low_rank.items():
        state[f"{name}.weight"] = module.up.weight @ module.down.weight
        if module.up.bias is not None:
            state[f"{name}.bias"] = module.up.bias
    for layer in loaded.layers:
        module = model.get_submodule(layer.name)
        if isinstance(module, CodesLinear):
            state[f"{layer.name}.weight"] = module.weight
    if getattr(loaded.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in state.items()}


def save_compressed(model: nn.Module, loaded: LoadedModel, plan: Plan, out: str | Path,
                    force: bool = False, log=None, extra: dict[str, bytes] | None = None
                    ) -> Path:
    """The HF directory at ``out``, by the output policy of ``outputs.publish_dir``;
    ``extra``: more files to put in it (a plan's recovered tensors, beside its plan.json)."""
    def fill(tmp: Path) -> None:
        for name, data in (extra or {}).items():
            (tmp / name).write_bytes(data)
        config = loaded.config.to_dict()
        config["dtype"] = "float16"
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file(dense_state_dict(model, loaded), str(tmp / "model.safetensors"),
                  metadata={"format": "pt", "autocompress_plan": json.dumps(plan.to_dict())})
        loaded.tokenizer.save_pretrained(tmp)
        (tmp / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2) + "\n")

    return publish_dir(out, "apply", fill, force=force, log=log)
