"""Distillation recovery: after a plan is built, train what its format lets change freely (each
quantized group's scale, of dense layers and of low-rank factors alike, and the RMS norms'
weights) so that the compressed model's next-token distributions match the uncompressed
model's (KL) on calibration windows. The codes, zero points, masks and every other weight stay
as the plan built them: the result is stored in the same format and bytes (EfficientQAT's
end-to-end stage trains the same quantization parameters; its block-wise stage, which also
moves the weights, is not done here).

A scale is trained in the log domain (``scale = built · exp(θ)``, θ from 0), so one learning rate
is a relative step for every group, small or large; at the end each scale is rounded to float16,
as the formats store it. Held-out KL is measured every ``eval_every`` steps: the best state
seen is the result, and training stops after ``patience`` measurements without improvement.
A checkpoint (trained tensors, optimiser state, step) is written atomically every
``checkpoint_every`` steps; a run given the same checkpoint path resumes from it.

    with compressed_in_place(loaded, plan, calib, codes=True) as model:
        result = KDRecovery(KDSettings(steps=400)).run(model, teacher, holdout_teacher)
"""

from __future__ import annotations

import math

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import AutocompressError
from ..recovery import KDSettings
from ..evaluate import ReferenceCache, evaluate
from .codes_linear import CodesLinear, decode


@dataclass
class RecoveryResult:
    """What training changed: the new tensors by name (``<layer>.scale`` [out, groups] and
    ``<norm>.weight``), and the held-out KL before, at the best step and after float16."""

    tensors: dict[str, torch.Tensor]
    kl_before: float
    kl_after: float
    best_step: int
    steps_run: int
    history: list[tuple[int, float]] = field(default_factory=list)
    lr: float = 0.0  # the rate trained at, after any back-off
    lr_abandoned: list[float] = field(default_factory=list)
    lr_lowered_at: list[int] = field(default_factory=list)  # steps where a stall quartered it


def trainable_parts(model: nn.Module) -> tuple[dict[str, CodesLinear], dict[str, nn.Module]]:
    """The matrices held as codes (their scales train: a dense layer, or each factor of a
    low-rank one, ``<layer>.down`` and ``<layer>.up``) and the RMS norms (their weights
    train)."""
    codes = {name: m for name, m in model.named_modules() if isinstance(m, CodesLinear)}
    norms = {name: m for name, m in model.named_modules()
             if type(m).__name__.endswith("RMSNorm") and isinstance(
                 getattr(m, "weight", None), nn.Parameter)}
    return codes, norms


class _Trainer:
    """Holds the trainable tensors, and puts them into the model's forward for the duration of
    a ``with`` block (scales through each CodesLinear's decode; norm weights as new tensors,
    so that the model's own, perhaps views of its file, are never written)."""

    def __init__(self, model: nn.Module):
        self.codes, self.norms = trainable_parts(model)
        if not self.codes:
            raise AutocompressError("nothing to recover: the plan holds no layer as RTN/GPTQ "
                                    "codes (GGUF types, 16-bit layers and 16-bit low-rank "
                                    "factors keep their weights)")
        self.built = {name: m.quantized.scale.detach().clone() for name, m in self.codes.items()}
        self.theta = {name: torch.zeros_like(s, requires_grad=True)
                      for name, s in self.built.items()}
        self.norm_weights = {name: m.weight.detach().clone().requires_grad_(True)
                             for name, m in self.norms.items()}
        self._originals: dict = {}

    def parameters(self) -> list[torch.Tensor]:
        return [*self.theta.values(), *self.norm_weights.values()]

    def scale(self, name: str) -> torch.Tensor:
        return self.built[name] * torch.exp(self.theta[name])

    def __enter__(self) -> "_Trainer":
        for name, module in self.codes.items():
            self._originals[name] = module.quantized
            module.forward = self._codes_forward(name, module)
        for name, module in self.norms.items():
            self._originals[name] = module.weight
            del module.weight
            module.weight = self.norm_weights[name]  # a plain tensor: autograd reaches it
        return self

    def _codes_forward(self, name: str, module: CodesLinear):
        def forward(x: torch.Tensor) -> torch.Tensor:
            weight = decode(replace(module.quantized, scale=self.scale(name)))
            return F.linear(x, weight.to(module.dtype), module.bias)
        return forward

    def __exit__(self, *exc) -> None:
        for name, module in self.codes.items():
            del module.forward  # the class's again
        for name, module in self.norms.items():
            del module.weight
            module.weight = self._originals[name]

    def state(self) -> dict[str, torch.Tensor]:
        """The trained tensors as the format stores them: scales rounded to float16."""
        out = {f"{n}.scale": self.scale(n).detach().half().float() for n in self.codes}
        out.update({f"{n}.weight": w.detach().clone() for n, w in self.norm_weights.items()})
        return out

    def restart(self) -> None:
        """Back to the plan's own tensors (inside the ``with`` block): scales as built, norms
        as loaded."""
        with torch.no_grad():
            for value in self.theta.values():
                value.zero_()
            for name, value in self.norm_weights.items():
                value.copy_(self._originals[name])

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Back to a state as ``state()`` gave it (its float16 scales as log-ratios to the
        built ones; a group whose built scale is 0 keeps θ = 0)."""
        with torch.no_grad():
            for name, built in self.built.items():
                ratio = state[f"{name}.scale"].to(built) / built
                ok = torch.isfinite(ratio) & (ratio > 0)
                self.theta[name].copy_(torch.where(ok, ratio.clamp_min(1e-30).log(),
                                                   torch.zeros_like(ratio)))
            for name, value in self.norm_weights.items():
                value.copy_(state[f"{name}.weight"])

    def load_values(self, theta: dict, norms: dict) -> None:
        with torch.no_grad():
            for name, value in theta.items():
                self.theta[name].copy_(value)
            for name, value in norms.items():
                self.norm_weights[name].copy_(value)


def apply_recovered(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put recovered tensors into a model built with its quantized layers as codes: each
    layer's scale replaced, each norm given its trained weight (new tensors: the model's own
    are left as they were, for ``compressed_in_place`` to restore)."""
    codes, norms = trainable_parts(model)
    expected = {f"{n}.scale" for n in codes} | {f"{n}.weight" for n in norms}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise AutocompressError(f"recovered tensors do not fit this plan's model (missing "
                                f"{missing[:3]}, unknown {extra[:3]}): recover again for it")
    for name, module in codes.items():
        scale = tensors[f"{name}.scale"]
        if scale.shape != module.quantized.scale.shape:
            raise AutocompressError(f"recovered scale of {name} has shape {tuple(scale.shape)}, "
                                    f"the layer {tuple(module.quantized.scale.shape)}")
        module.quantized = replace(module.quantized, scale=scale.to(module.quantized.scale))
    put_norms(norms, tensors)


def put_norms(norms: dict[str, nn.Module], tensors: dict[str, torch.Tensor]) -> None:
    """Each norm given its recovered weight as a new tensor (its own is left as it was)."""
    for name, module in norms.items():
        module.weight.data = tensors[f"{name}.weight"].to(module.weight, copy=True)


class KDRecovery:
    """Train a compressed model's scales and norms towards the uncompressed model."""

    def __init__(self, settings: KDSettings = KDSettings(), checkpoint: Path | None = None,
                 progress: bool = True):
        self.settings, self.checkpoint, self.progress = settings, checkpoint, progress

    def run(self, model: nn.Module, teacher: ReferenceCache,
            holdout: ReferenceCache) -> RecoveryResult:
        """``teacher``: the uncompressed model's distributions on the calibration windows;
        ``holdout``: on held-out windows (for early stopping and the reported KLs)."""
        s = self.settings
        trainer = _Trainer(model)
        optimizer = torch.optim.Adam(trainer.parameters(), lr=s.lr)
        frozen = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        generator = torch.Generator().manual_seed(s.seed)
        order = torch.randperm(teacher.windows.shape[0], generator=generator).tolist()
        step, history, best, lr, abandoned, lowered = 0, [], None, s.lr, [], []
        loaded = self._load_checkpoint(trainer, optimizer)
        if loaded is not None:
            step, history, best, lr, abandoned, lowered = loaded
        try:
            with trainer:
                if not history:
                    history.append((0, self._held_out_kl(model, holdout)))
                    best = (history[0][1], 0, trainer.state())
                kl_before = history[0][1]
                bar = tqdm(total=s.steps, initial=step, desc="recover (kd)",
                           disable=not self.progress, leave=False)
                model.train(False)  # no dropout: the teacher's forward, with gradients
                while step < s.steps:
                    for group in optimizer.param_groups:  # from the step alone: resumes alike
                        group["lr"] = lr * _lr_factor(s.schedule, step, s.steps)
                    index = order[step % len(order)]
                    loss = self._kl_loss(model, teacher, index)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    step += 1
                    bar.update()
                    bar.set_postfix(kl=f"{loss.item():.4f}")
                    if step % s.eval_every == 0 or step == s.steps:
                        kl = self._held_out_kl(model, holdout)
                        history.append((step, kl))
                        if kl < best[0]:
                            best = (kl, step, trainer.state())
                        elif len(history) == 2 and len(abandoned) < s.lr_backoffs:
                            # the first validation is no better: the rate overshoots; start
                            # over from the plan's tensors at a quarter of it
                            abandoned.append(lr)
                            trainer.restart()
                            step, history = 0, history[:1]
                            bar.reset()
                            lr, optimizer = self._quarter_rate(trainer, lr, bar)
                    # (step 0 after a back-off too: a resume goes on at the lowered rate)
                    since = max(best[1], lowered[-1] if lowered else 0)
                    if _stalled(history, since, s.patience) and step < s.steps:
                        if len(lowered) >= s.plateau_backoffs:
                            self._save_checkpoint(trainer, optimizer, step, history, best, lr,
                                                  abandoned, lowered)
                            break
                        # stalled at this rate: on from the best state at a quarter of it
                        lowered.append(step)
                        trainer.load_state(best[2])
                        lr, optimizer = self._quarter_rate(trainer, lr, bar)
                    if step % s.checkpoint_every == 0 or step == s.steps:
                        self._save_checkpoint(trainer, optimizer, step, history, best, lr,
                                              abandoned, lowered)
                bar.close()
        finally:
            for p, flag in frozen:
                p.requires_grad_(flag)
        kl_best, best_step, tensors = best
        apply_recovered(model, tensors)  # the float16-rounded best, measured as it is stored
        kl_after = evaluate(model, holdout.windows, holdout, progress=False).kl
        return RecoveryResult(tensors, kl_before, kl_after, best_step, step, history, lr,
                              abandoned, lowered)

    @staticmethod
    def _quarter_rate(trainer: _Trainer, lr: float, bar) -> tuple[float, torch.optim.Adam]:
        """A quarter of the rate, and a new Adam over the trainer's tensors as they are now
        (the old one's moments belong to the larger steps)."""
        lr /= 4
        bar.set_description(f"recover (kd, lr {lr:g})")
        return lr, torch.optim.Adam(trainer.parameters(), lr=lr)

    @staticmethod
    def _kl_loss(model: nn.Module, teacher: ReferenceCache, index: int) -> torch.Tensor:
        window = teacher.windows[index]
        logits = model(window.unsqueeze(0).to(_device(model))).logits[0, :-1].float()
        student = F.log_softmax(logits, dim=-1)
        reference = teacher.get(index).to(student.device)
        return (reference.exp() * (reference - student)).sum(-1).mean()

    @staticmethod
    def _held_out_kl(model: nn.Module, holdout: ReferenceCache) -> float:
        with torch.no_grad():
            return evaluate(model, holdout.windows, holdout, progress=False).kl

    def _save_checkpoint(self, trainer: _Trainer, optimizer, step, history, best, lr,
                         abandoned, lowered) -> None:
        if self.checkpoint is None:
            return
        import io
        from dataclasses import asdict

        from ..io_utils import atomic_write_bytes

        buffer = io.BytesIO()
        torch.save({"step": step, "history": history, "best": best, "lr": lr,
                    "lr_abandoned": abandoned, "lr_lowered_at": lowered,
                    "theta": {n: t.detach() for n, t in trainer.theta.items()},
                    "norms": {n: t.detach() for n, t in trainer.norm_weights.items()},
                    "optimizer": optimizer.state_dict(), "settings": asdict(self.settings)},
                   buffer)
        atomic_write_bytes(self.checkpoint, buffer.getvalue())

    def _load_checkpoint(self, trainer: _Trainer, optimizer):
        if self.checkpoint is None or not Path(self.checkpoint).exists():
            return None
        try:
            saved = torch.load(self.checkpoint, weights_only=False)
            if set(saved["theta"]) != set(trainer.theta) or \
                    set(saved["norms"]) != set(trainer.norm_weights):
                raise KeyError("another plan's tensors")
            trainer.load_values(saved["theta"], saved["norms"])
            optimizer.load_state_dict(saved["optimizer"])
        except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is one message
            raise AutocompressError(f"the recovery checkpoint {self.checkpoint} cannot be "
                                    f"resumed ({exc}); delete it to start over") from None
        return (saved["step"], saved["history"], saved["best"],
                saved.get("lr", self.settings.lr), saved.get("lr_abandoned", []),
                saved.get("lr_lowered_at", []))


def _lr_factor(schedule: str, step: int, steps: int) -> float:
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / steps))
    return 1.0


def _stalled(history: list[tuple[int, float]], best_step: int, patience: int) -> bool:
    """``patience`` held-out measurements since the best one."""
    return sum(1 for step, _ in history if step > best_step) >= patience


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


__all__ = ["KDSettings", "KDRecovery", "RecoveryResult", "apply_recovered", "trainable_parts"]


def recovery_windows(tokenizer, provenance, n_train: int, n_val: int,
                     reserved_at_end: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration text's first ``n_train`` windows (training) and the ``n_val`` right
    after them (early stopping), clear of the ``reserved_at_end`` windows at the text's end
    where the search measured the plan (data.calibration_data), so that its held-out figures
    stay held out."""
    from ..data import load_stream

    stream = load_stream(tokenizer, provenance.calib_text, "calib")
    available = stream.max_windows(provenance.window_len) - reserved_at_end
    if n_train + n_val > available:
        raise AutocompressError(
            f"{stream.source} has {stream.n_tokens} tokens: {available} windows of "
            f"{provenance.window_len} before the {reserved_at_end} held out at its end, fewer "
            f"than the {n_train} training + {n_val} validation windows recovery needs: fewer "
            f"--kd-train-windows or --kd-val-windows")
    windows = stream.windows(n_train + n_val, provenance.window_len)
    return windows[:n_train], windows[n_train:]


@contextmanager
def recovered_in_place(loaded, plan, recipe, settings: KDSettings = KDSettings(),
                       checkpoint: Path | None = None,
                       progress: bool = True) -> Iterator[tuple[nn.Module, object, bytes]]:
    """Build ``plan`` in place (as codes), recover it, and yield (model, the plan with its
    recovery record, the recovered tensors' file bytes) for the duration of the block. Trains
    on the plan's calibration windows (its provenance's; or the first
    ``settings.train_windows`` of its calibration text), stops early on the
    ``settings.val_windows`` after them."""
    from dataclasses import replace as replace_field

    from ..provenance import calibration_windows
    from ..recovery import RecoveryRecord, digest, tensors_bytes
    from ..search.holdout import windows_held_out_at_end
    from .reproduce import built_in_place

    if plan.recovery is not None:
        raise AutocompressError("this plan is already recovered: recover the plan it was "
                                "made from")
    provenance = recipe.provenance
    train = None
    if settings.train_windows is None:  # the plan's calibration windows, the text's first
        train = recipe.calib if recipe.calib is not None else \
            calibration_windows(loaded.tokenizer, provenance)
    first, val = recovery_windows(loaded.tokenizer, provenance,
                                  settings.train_windows or train.shape[0],
                                  settings.val_windows,
                                  reserved_at_end=windows_held_out_at_end(plan))
    train = first if train is None else train
    # the teacher is the model before the plan is built into it
    teacher = ReferenceCache(loaded.model, train).fill(progress, desc="teacher")
    held_out = ReferenceCache(loaded.model, val).fill(progress, desc="validation")
    with built_in_place(loaded, plan, recipe, progress=progress, codes=True) as model:
        result = KDRecovery(settings, checkpoint, progress).run(model, teacher, held_out)
        data = tensors_bytes(result.tensors)
        record = RecoveryRecord(
            method="kd", sha256=digest(data), steps=result.steps_run,
            best_step=result.best_step, lr=result.lr, lr_abandoned=result.lr_abandoned,
            lr_lowered_at=result.lr_lowered_at,
            schedule=settings.schedule,
            seed=settings.seed,
            train_windows=int(train.shape[0]), val_windows=int(val.shape[0]),
            kl_before=result.kl_before, kl_after=result.kl_after)
        yield model, replace_field(plan, recovery=record), data
