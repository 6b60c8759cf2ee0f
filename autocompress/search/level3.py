"""Level 3 of the search, driven from the search's process: the job written for Ray Tune's
workers (windows, reference, calibration windows, each candidate's plan), and their results
put back on the candidates (search/tune_level.py runs the trials)."""

from __future__ import annotations

from ..peak_memory import return_freed_memory
from ..residency import release_module
from .tune_level import Level3Settings, run_level3, write_candidate, write_job


def measure_with_tune(loaded, candidates, meter, calib, settings, out, log, progress
                       ) -> int | None:
    """Level 3: write the job (windows, reference, calibration windows, each candidate's plan)
    and run Ray Tune, whose workers build and measure the candidates as ``meter`` would;
    returns the largest peak resident memory of the workers."""
    from ..compress.apply import uses_calibration
    from ..evaluate import ReferenceCache

    job = out / "level3"
    windows = calib.holdout[:settings.eval_windows]
    calibrated = any(uses_calibration({**c.configs, **meter.fixed}.values()) for c in candidates)
    reference = ReferenceCache(loaded.model, windows).fill()
    # the driver computes nothing more while the workers build: its weights leave memory
    # (pages of the model's file, read in again if needed) and so do freed heap pages
    release_module(loaded.model)
    return_freed_memory()
    write_job(job, loaded.spec or loaded.source, windows, reference,
              threads=settings.num_cpus or 2, calib=calib.calib if calibrated else None,
              mode=meter.mode, gptq=meter.gptq, placement=loaded.placement.worker_spec())
    names = {}
    for cand in candidates:
        names[cand.signature] = cand
        write_candidate(job, cand.signature, {**cand.configs, **meter.fixed})
    results = run_level3(job, list(names), Level3Settings(
        windows=settings.eval_windows, num_cpus=settings.num_cpus, address=settings.address),
        tokens_per_window=settings.window_len - 1, resume=settings.resume, log=log,
        progress=progress)
    worker_peaks = [results[name].pop("peak_rss_bytes", None) for name in names]
    for name, cand in names.items():
        cand.measured = results[name]
    return max((p for p in worker_peaks if p), default=None)
