"""Level 2's trials measured side by side on Ray workers.

Each worker (a Ray actor, one CPU and ``threads`` torch threads) loads the model once and
holds its own PlanMeter: the same held-out windows, calibration statistics (read from the
driver's StatsStore where the worker sees its directory) and settings as the in-process
meter, its own memo. ``measure_many`` sends one batch of plans, a plan per free
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
                 threads: int, placement: dict[str, str], stats_dir: str | None = None):
        import time
        from pathlib import Path

        start = time.time()
        torch.set_num_threads(threads)
        from ..compress.stats_store import KEY_FILE, StatsStore
        from ..peak_memory import bound_heap

        bound_heap()
        from ..compress.weights import GPTQSettings
        from ..model import load_model
        from .measure import PlanMeter

        loaded = load_model(spec, **placement)
        stats = None
        if stats_dir and (Path(stats_dir) / KEY_FILE).is_file():
            # the driver's statistics (same model, windows and dtype), read where they are;
            # a node that cannot see the directory takes its own
            stats = StatsStore.reader(stats_dir, loaded.layers, loaded.placement.device)
            if not stats.complete:
                stats = None
        self.meter = PlanMeter(loaded, holdout, calib, progress=False,
                               gptq=GPTQSettings(**gptq),
                               fixed={n: LayerConfig.from_dict(c) for n, c in fixed.items()},
                               hessian_layers=None if hessian_layers is None
                               else set(hessian_layers), stats=stats)
        # what each worker spent its time on (wall clock, seconds since the epoch): where a
        # run with more workers loses its speed-up
        self.timeline: list[tuple[str, float, float]] = [("load", start, time.time())]

    def measure(self, configs: dict[str, dict]) -> float:
        import time

        start = time.time()
        plan = {n: LayerConfig.from_dict(c) for n, c in configs.items()}
        kl = self.meter.measure(plan)["kl"]
        self.timeline.append(("measure", start, time.time()))
        return kl

    def timings(self) -> list[tuple[str, float, float]]:
        return self.timeline


class MeterPool:
    """``workers`` Ray actors measuring plans as ``PlanMeter(parallel mode)`` does."""

    def __init__(self, spec: str, holdout: torch.Tensor, calib: torch.Tensor | None,
                 gptq, fixed: dict[str, LayerConfig], hessian_layers: set[str] | None,
                 workers: int, threads: int = 1, num_cpus: int | None = None,
                 address: str | None = None, placement: dict[str, str] | None = None,
                 stats_dir: str | None = None):
        """``placement``: the driver's ``Placement.worker_spec()`` (each worker loads its model
        there; a GPU worker asks Ray for one GPU). ``stats_dir``: the driver's complete
        StatsStore, which the workers read instead of taking statistics of their own."""
        import dataclasses

        import ray

        from .ray_cluster import start_ray

        start_ray(num_cpus, address)
        placement = placement or {"device": "cpu", "dtype": "float32"}
        actor = ray.remote(num_cpus=threads,
                           num_gpus=1 if placement["device"] == "cuda" else 0)(_MeterWorker)
        args = (spec, holdout, calib, dataclasses.asdict(gptq),
                {n: c.to_dict() for n, c in fixed.items()},
                None if hessian_layers is None else sorted(hessian_layers), threads, placement,
                stats_dir)
        self._workers = [actor.remote(*args) for _ in range(workers)]
        self._seen: list[set] = [set() for _ in range(workers)]  # memo keys sent to each

    @property
    def size(self) -> int:
        return len(self._workers)

    def measure_many(self, plans: list[dict[str, LayerConfig]]) -> list[float]:
        """KLs of ``plans``, in order. Each plan goes, in order, to a free worker as soon as
        one is free (a slow plan keeps one worker, not the batch, waiting): to the free worker
        whose memo already holds most of its expensive layers (GPTQ, low rank, GGUF: what the
        memo keeps), so that a layer-config computed by one worker is rarely computed again by
        another. Where a plan goes changes its speed, never its KL."""

        kls: list[float | None] = [None] * len(plans)
        free = list(range(len(self._workers)))
        running: dict = {}  # future -> (plan index, worker)
        for index, plan in enumerate(plans):
            if not free:
                self._collect(running, kls, free)
            keys = {(name, cfg) for name, cfg in plan.items()
                    if cfg.is_low_rank or cfg.method == "gptq" or cfg.is_gguf}
            worker = max(free, key=lambda w: (len(keys & self._seen[w]), -w))
            free.remove(worker)
            self._seen[worker] |= keys
            running[self._workers[worker].measure.remote(
                {n: c.to_dict() for n, c in plan.items()})] = (index, worker)
        while running:
            self._collect(running, kls, free)
        return kls

    @staticmethod
    def _collect(running: dict, kls: list, free: list[int]) -> None:
        """Wait for the next plan to finish; its worker is free again."""
        import ray

        done, _ = ray.wait(list(running), num_returns=1)
        for future in done:
            index, worker = running.pop(future)
            kls[index] = ray.get(future)
            free.append(worker)

    def timings(self) -> list[list[tuple[str, float, float]]]:
        """Each worker's timeline: (what, start, end) of its model load and each plan."""
        import ray

        return ray.get([worker.timings.remote() for worker in self._workers])

    def close(self) -> None:
        import ray

        for worker in self._workers:
            ray.kill(worker)
        self._workers = []


def summarize_timelines(timelines: list[list[tuple[str, float, float]]], start: float
                        ) -> list[dict[str, float]]:
    """Per worker, seconds from ``start`` (level 2's start, wall clock) to its model being
    loaded, seconds spent measuring and plans measured: with the level's wall time, where a
    run with more workers loses its speed-up (a worker idle while the driver asks or another
    worker finishes)."""
    out = []
    for timeline in timelines:
        loaded = next(end for what, _, end in timeline if what == "load")
        measures = [(s, e) for what, s, e in timeline if what == "measure"]
        out.append({"ready_s": round(loaded - start, 2),
                    "measuring_s": round(sum(e - s for s, e in measures), 2),
                    "plans": len(measures),
                    "last_done_s": round(max((e for _, e in measures), default=loaded)
                                         - start, 2)})
    return out
