"""Measured sensitivity: the KL to the base model when only one layer takes an option.

The cost of option o for layer l is

    KL_l(o) = mean over predicted tokens of KL(P_ref || P_model)   (nats per token)

with P_ref the unchanged model's next-token distribution and P_model the same model with only
W_l replaced by W_l + ΔW_o: the convention of ``evaluate.py``, so a table of measured costs is
ground truth on the calibration windows, not a second-order approximation (it also sees the
non-additive damage of 2-bit options inside one layer).

Cost: one forward per (layer, option) would be hours for a real model. Two savings:

- **Prefix reuse.** ``prepare`` runs the base model once and keeps the input of every decoder
  block (hidden states and the keyword arguments the model passes blocks: rotary
  ``position_embeddings``, mask, positions) and the base log-probabilities. A layer in block b
  then only needs blocks b..end + final norm + LM head, from the cached input of block b. On
  average that halves the work, and layers of the last blocks are almost free.
- **Parallelism with Ray (optional).** ``workers > 1`` (or an ``address``) starts that many Ray
  actors, each receiving the cached state once (one ``ray.put``; a plain task would deserialize
  the model on every call); ``layer_costs`` splits one layer's options over them and
  ``costs_many`` hands out whole layers as they finish. ``workers=1`` never imports Ray.

The weight under test is swapped in and the original tensor put back in a ``finally``, so the
model is exactly unchanged afterwards. An all-zero ΔW (16-bit, dense) costs 0 without a forward,
and costs are floored at 0 (KL ≥ 0; float rounding could leave a tiny negative). The KL is
computed against a reference taken along the same replay path (see ``PrefixCache``) in a form
that keeps float32 exact to ~1e-6 relative (``kl_rows``), so even the ~1e-6-nat costs of 8-bit
options are resolved.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from ..placement import on_device_of
from ..errors import AutocompressError
from ..model import LayerInfo, LoadedModel
from .base import SensitivityProxy, register

#: Bumped whenever the way costs are computed changes (part of the cache key).
MEASURED_VERSION = 1


def _model_parts(model: nn.Module) -> tuple[nn.ModuleList, nn.Module, nn.Module]:
    """(decoder blocks, final norm, LM head) of a Llama-style causal LM."""
    inner = getattr(model, "model", None)
    blocks = getattr(inner, "layers", None)
    norm = getattr(inner, "norm", None)
    head = getattr(model, "lm_head", None)
    if blocks is None or norm is None or head is None:
        raise AutocompressError(
            "the measured proxy needs a Llama-style model (model.layers, model.norm, lm_head)")
    return blocks, norm, head


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class PrefixCache:
    """Base-model activations for a fixed set of windows, grouped in batches of windows.

    ``hidden[c][b]``: input of block b for batch c, [n_c, L, d]; ``kwargs[c][b]``: the keyword
    arguments block b received; ``ref[c]``: base logits [n_c, L-1, V] (float32) of the replayed
    blocks, ``ref_p[c]`` their softmax (float32). Plain tensors and dicts: picklable, so Ray can
    ship it with the model. Memory: 8 bytes per predicted token and vocabulary entry (one
    128-token window of a 49k vocabulary: 50 MB).

    The reference comes from the same replay path that perturbed runs take, so an unchanged
    model gives exactly 0; see ``kl_rows`` for how the KL stays exact at 1e-9 nats in float32.
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_windows: int = 4):
        if windows.ndim != 2 or windows.shape[1] < 2:
            raise AutocompressError("the measured proxy needs windows [n, L] with L >= 2")
        self.model = model
        self.hidden: list[list[torch.Tensor]] = []
        self.kwargs: list[list[dict]] = []
        self.ref: list[torch.Tensor] = []
        self.ref_p: list[torch.Tensor] = []
        self.tokens = int(windows.shape[0] * (windows.shape[1] - 1))
        blocks, _, _ = _model_parts(model)
        self.n_blocks = len(blocks)
        step = max(1, int(batch_windows))
        for start in range(0, windows.shape[0], step):
            self._capture(windows[start:start + step])

    @torch.no_grad()
    def _capture(self, batch: torch.Tensor) -> None:
        blocks, _, _ = _model_parts(self.model)
        hidden: list[torch.Tensor | None] = [None] * len(blocks)
        kwargs: list[dict | None] = [None] * len(blocks)
        handles = []
        for b, block in enumerate(blocks):
            def grab(_module, args, kw, b=b):
                kw = {k: v for k, v in kw.items() if k != "past_key_values"}
                if args:
                    hidden[b] = args[0].detach()
                    if len(args) > 1:
                        raise AutocompressError("decoder blocks take extra positional inputs; "
                                                "the measured proxy cannot replay them")
                else:
                    hidden[b] = kw.pop("hidden_states").detach()
                kwargs[b] = kw

            handles.append(block.register_forward_pre_hook(grab, with_kwargs=True))
        try:
            logits = self.model(on_device_of(self.model, batch), use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        if any(h is None for h in hidden):
            raise AutocompressError("not every decoder block ran in the base forward")
        self.hidden.append(hidden)
        self.kwargs.append(kwargs)
        c = len(self.hidden) - 1
        # The replayed suffix must reproduce the model's own logits, or the architecture does
        # something between/after the blocks that we do not replay (logit soft-capping, ...).
        replay = self.logits_from(c, 0)
        full = logits[:, :-1].float()
        tol = 1e-4 * (1.0 + float(full.abs().max()))
        if not torch.allclose(replay, full, rtol=0, atol=tol):
            err = float((replay - full).abs().max())
            raise AutocompressError(f"replaying the decoder blocks does not reproduce the model's "
                                    f"logits (max error {err:.3g}); the measured proxy does not "
                                    f"support this architecture")
        self.ref.append(replay)
        self.ref_p.append(torch.softmax(replay, dim=-1))

    @torch.no_grad()
    def logits_from(self, c: int, block: int) -> torch.Tensor:
        """Logits of the predicting positions [n, L-1, V] (float32) of batch c, running blocks
        ``block``..end of the model as it is now from the cached input of ``block``."""
        blocks, norm, head = _model_parts(self.model)
        h = self.hidden[c][block]
        for b in range(block, len(blocks)):
            h = _block_output(blocks[b](h, **self.kwargs[c][b]))
        return head(norm(h[:, :-1])).float()

    @torch.no_grad()
    def kl_from(self, block: int) -> float:
        """Mean KL(P_ref || P_now) per predicted token over all windows (nats)."""
        total = 0.0
        for c in range(len(self.hidden)):
            total += float(kl_rows(self.ref[c], self.ref_p[c], self.logits_from(c, block)).sum())
        return total / self.tokens


def kl_rows(ref_logits: torch.Tensor, ref_p: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref_logits) || softmax(logits)) per position (float64), from float32 inputs.

    With δ = z_q − z_ref and p the reference distribution, KL = log E_p[e^δ] − E_p[δ] exactly.
    Centring δ at a ≈ E_p[δ] and writing e^x = 1 + x + (expm1(x) − x) gives
    KL = log1p(E_p[x] + E_p[g]) − E_p[x] with g = expm1(x) − x ≥ 0: the first-order terms cancel
    analytically, so float32 elementwise work (3x faster than float64 log-softmaxes here) keeps
    ~1e-6 relative accuracy down to KLs of 1e-9; the reductions accumulate in float64.
    ``logits`` is overwritten.
    """
    p_sum = ref_p.sum(dim=-1, dtype=torch.float64)
    x = logits.sub_(ref_logits)  # δ
    mean = (ref_p * x).sum(dim=-1, dtype=torch.float64) / p_sum  # E_p[δ]
    a = mean.float()
    x.sub_(a.unsqueeze(-1))  # x = δ − a
    ex = mean - a.double()  # E_p[x], without another pass
    g = torch.expm1(x).sub_(x).mul_(ref_p)
    eg = g.sum(dim=-1, dtype=torch.float64) / p_sum
    return torch.log1p(ex + eg) - ex


def measure_layer(prefix: PrefixCache, layer_name: str, block: int, weight: torch.Tensor,
                  deltas: list[torch.Tensor]) -> list[float]:
    """KL of each W + ΔW, swapped into ``layer_name`` one at a time; W is put back exactly."""
    module = prefix.model.get_submodule(layer_name)
    original = module.weight.data
    base = weight.to(torch.float32)
    costs = []
    try:
        for d in deltas:
            if not bool(d.any()):
                costs.append(0.0)
                continue
            module.weight.data = (base + d.to(torch.float32)).to(original.dtype)
            kl = prefix.kl_from(block)
            costs.append(max(kl, 0.0) if math.isfinite(kl) else float("inf"))
    finally:
        module.weight.data = original
    return costs


class _RayPool:
    """Ray actors, each holding one copy of the PrefixCache (model included)."""

    def __init__(self, prefix: PrefixCache, workers: int, address: str | None, threads: int):
        try:
            import ray
        except ImportError:
            raise AutocompressError("the measured proxy with workers > 1 or an address needs "
                                    "Ray: pip install 'ray[default]'") from None
        self.ray = ray
        self.owns = False
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
            self.owns = True
        if address and workers <= 1:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1)) // max(1, threads))

        @ray.remote(num_cpus=threads)
        class MeasuredWorker:
            def __init__(self, state, n_threads):
                torch.set_num_threads(n_threads)
                self.prefix = state  # resolved from the ObjectRef once, here

            def ready(self):
                return True

            def costs(self, layer_name, block, weight, deltas):
                return measure_layer(self.prefix, layer_name, block, weight, deltas)

        state = ray.put(prefix)
        self.actors = [MeasuredWorker.remote(state, threads) for _ in range(workers)]
        try:  # wait for the actors, so a worker that cannot start fails here, not mid-table
            ray.get([actor.ready.remote() for actor in self.actors])
        except BaseException:
            self.close()
            raise

    def split_layer(self, layer: LayerInfo, weight: torch.Tensor,
                    deltas: list[torch.Tensor]) -> list[float]:
        """One layer's options, split in contiguous chunks over the actors."""
        n = len(self.actors)
        bounds = [round(i * len(deltas) / n) for i in range(n + 1)]
        refs = [actor.costs.remote(layer.name, layer.block, weight, deltas[lo:hi])
                for actor, lo, hi in zip(self.actors, bounds, bounds[1:]) if hi > lo]
        return [c for part in self.ray.get(refs) for c in part]

    def many(self, jobs: Iterable[tuple[LayerInfo, torch.Tensor, list[torch.Tensor]]]
             ) -> Iterator[tuple[str, list[float]]]:
        """Whole layers to idle actors; results in completion order."""
        ray = self.ray
        jobs = iter(jobs)
        idle = list(self.actors)
        pending: dict[Any, tuple[Any, str]] = {}
        exhausted = False
        while True:
            while idle and not exhausted:
                job = next(jobs, None)
                if job is None:
                    exhausted = True
                    break
                layer, weight, deltas = job
                actor = idle.pop()
                ref = actor.costs.remote(layer.name, layer.block, weight, deltas)
                pending[ref] = (actor, layer.name)
            if not pending:
                return
            done, _ = ray.wait(list(pending), num_returns=1)
            actor, name = pending.pop(done[0])
            idle.append(actor)
            yield name, ray.get(done[0])

    def close(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:  # already gone
                pass
        self.actors = []
        if self.owns:
            from ..interrupts import shut_down_ray

            shut_down_ray()
        self.owns = False


@register
class MeasuredProxy(SensitivityProxy):
    """cost(ΔW) = mean KL(P_ref || P_model) per predicted token, only this layer at W + ΔW.

    ``workers``: 1 = in process (no Ray); > 1 = that many local Ray actors (one CPU each unless
    ``threads_per_worker`` says more). ``address``: join an existing Ray cluster (its nodes need
    ``autocompress`` importable). ``batch_windows``: windows per forward (memory vs speed; the
    numbers agree to float rounding). Call ``close()`` (or use ``with``) to stop Ray actors.
    """

    name = "measured"
    uses_gradients = False

    def __init__(self, workers: int = 1, address: str | None = None, batch_windows: int = 4,
                 threads_per_worker: int = 1):
        if workers < 1:
            raise AutocompressError("the measured proxy needs workers >= 1")
        self.workers = int(workers)
        self.address = address
        self.batch_windows = int(batch_windows)
        self.threads_per_worker = max(1, int(threads_per_worker))
        self.prefix: PrefixCache | None = None
        self._pool: _RayPool | None = None

    @property
    def uses_ray(self) -> bool:
        return self.workers > 1 or bool(self.address)

    def prepare(self, loaded: LoadedModel, windows: torch.Tensor, layers: list[LayerInfo],
                progress: bool = True) -> None:
        self.close()
        for layer in layers:
            if layer.block is None:
                raise AutocompressError(f"the measured proxy covers block layers only, "
                                        f"not {layer.name}")
        self.prefix = PrefixCache(loaded.model, windows, self.batch_windows)
        if self.uses_ray:
            self._pool = _RayPool(self.prefix, self.workers, self.address,
                                  self.threads_per_worker)

    def _need_prefix(self) -> PrefixCache:
        if self.prefix is None:
            raise AutocompressError("MeasuredProxy.prepare must run before layer_costs")
        return self.prefix

    def layer_costs(self, layer: LayerInfo, weight: torch.Tensor,
                    deltas: list[torch.Tensor]) -> list[float]:
        prefix = self._need_prefix()
        if self._pool is not None and len(deltas) > 1:
            return self._pool.split_layer(layer, weight, deltas)
        return measure_layer(prefix, layer.name, layer.block, weight, deltas)

    def costs_many(self, jobs: Iterable[tuple[LayerInfo, torch.Tensor, list[torch.Tensor]]]
                   ) -> Iterator[tuple[str, list[float]]]:
        """(layer name, costs) for each (layer, weight, deltas) job, layers run in parallel
        when Ray is on (completion order), one after another otherwise (job order)."""
        prefix = self._need_prefix()
        if self._pool is not None:
            yield from self._pool.many(jobs)
            return
        for layer, weight, deltas in jobs:
            yield layer.name, measure_layer(prefix, layer.name, layer.block, weight, deltas)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> "MeasuredProxy":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def describe(self) -> dict:
        # workers / address / batching change where and how fast, not the numbers
        return {"proxy": self.name, "version": MEASURED_VERSION,
                "kl": "mean KL(ref||model) per predicted token"}
