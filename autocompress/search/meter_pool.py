"""Level 2's trials measured side by side on Ray workers.

Each worker (a Ray actor, one CPU and ``threads`` torch threads) loads the model once and
holds its own PlanMeter: the same held-out windows, calibration statistics and settings as the
in-process meter, its own memo. ``measure_many`` sends one batch of plans, a plan per free
worker, and returns their KLs in order. A plan's KL does not depend on which worker measured
it, nor on how many there are (every worker computes with the same thread count), so a study
run with 1 worker and with 2 asks and measures the same trials; only the wall time differs.
"""

from __future__ import annotations

import torch

from ..plan import LayerConfig


class _MeterWorker:
    def __init__(self, spec: str, holdout: torch.Tensor, calib: torch.Tensor | None,
                 gptq: dict, fixed: dict[str, dict], hessian_layers: list[str] | None,
                 threads: int, placement: dict[str, str]):
        torch.set_num_threads(threads)
        from ..compress.weights import GPTQSettings
        from ..model import load_model
        from .measure import PlanMeter

        self.meter = PlanMeter(load_model(spec, **placement), holdout, calib, progress=False,
                               gptq=GPTQSettings(**gptq),
                               fixed={n: LayerConfig.from_dict(c) for n, c in fixed.items()},
                               hessian_layers=None if hessian_layers is None
                               else set(hessian_layers))

    def measure(self, configs: dict[str, dict]) -> float:
        plan = {n: LayerConfig.from_dict(c) for n, c in configs.items()}
        return self.meter.measure(plan)["kl"]


class MeterPool:
    """``workers`` Ray actors measuring plans as ``PlanMeter(parallel mode)`` does."""

    def __init__(self, spec: str, holdout: torch.Tensor, calib: torch.Tensor | None,
                 gptq, fixed: dict[str, LayerConfig], hessian_layers: set[str] | None,
                 workers: int, threads: int = 1, num_cpus: int | None = None,
                 address: str | None = None, placement: dict[str, str] | None = None):
        """``placement``: the driver's ``Placement.worker_spec()`` (each worker loads its model
        there; a GPU worker asks Ray for one GPU)."""
        import dataclasses

        import ray

        from .tune_level import start_ray

        start_ray(num_cpus, address)
        placement = placement or {"device": "cpu", "dtype": "float32"}
        actor = ray.remote(num_cpus=threads,
                           num_gpus=1 if placement["device"] == "cuda" else 0)(_MeterWorker)
        args = (spec, holdout, calib, dataclasses.asdict(gptq),
                {n: c.to_dict() for n, c in fixed.items()},
                None if hessian_layers is None else sorted(hessian_layers), threads, placement)
        self._workers = [actor.remote(*args) for _ in range(workers)]
        self._seen: list[set] = [set() for _ in range(workers)]  # memo keys sent to each

    @property
    def size(self) -> int:
        return len(self._workers)

    def measure_many(self, plans: list[dict[str, LayerConfig]]) -> list[float]:
        """KLs of ``plans``, in order: up to one plan per worker at a time, each sent to the
        free worker whose memo already holds most of its expensive layers (GPTQ, low rank,
        GGUF: what the memo keeps), so that a layer-config computed by one worker is rarely
        computed again by another. Where a plan goes changes its speed, never its KL."""
        import ray

        kls: list[float] = []
        for start in range(0, len(plans), len(self._workers)):
            batch = plans[start:start + len(self._workers)]
            free = list(range(len(self._workers)))
            futures = []
            for plan in batch:
                keys = {(name, cfg) for name, cfg in plan.items()
                        if cfg.is_low_rank or cfg.method == "gptq" or cfg.is_gguf}
                worker = max(free, key=lambda w: (len(keys & self._seen[w]), -w))
                free.remove(worker)
                self._seen[worker] |= keys
                futures.append(self._workers[worker].measure.remote(
                    {n: c.to_dict() for n, c in plan.items()}))
            kls += ray.get(futures)
        return kls

    def close(self) -> None:
        import ray

        for worker in self._workers:
            ray.kill(worker)
        self._workers = []
