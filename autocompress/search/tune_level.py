"""Level 3: the best candidates evaluated for real, as Ray Tune trials.

The driver writes a job directory: the held-out windows, the uncompressed model's reference
for them (the head's input per position, a few MB; the worker puts it through its own copy of
the head), the calibration windows, how candidates are built, and each candidate as its plan
(a few KB; no weights). A trial loads the model once per worker, builds its candidate into it
in place exactly as ``apply`` builds a plan (sequential calibration through the compressed
prefix, GPTQ settings, source GGUF tensors kept), and evaluates window by window, reporting KL
and perplexity so far against the number of evaluated tokens; ASHA stops candidates that
trail after the first windows. The driver no longer builds the candidates one after another:
the workers build them side by side. Each report carries a checkpoint (the running
sums), so a trial interrupted with its driver continues from its last window when the
experiment is restored (``--resume``).

Ray starts, or joins a cluster, through ``ray_cluster.start_ray``; a cluster's workers need
this package and the job directory (a shared file system).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import faults
from ..compress.weights import GPTQSettings
from ..errors import AutocompressError
from ..io_utils import atomic_write_text
from ..plan import LayerConfig
from .ray_cluster import start_ray, wait_for_cpus

EXPERIMENT = "level3"


@dataclass
class Level3Settings:
    windows: int = 8  # held-out windows at full fidelity
    grace_windows: int = 1  # ASHA looks at candidates after this many windows
    reduction_factor: int = 2
    num_cpus: int | None = None  # local Ray: default all cores; a cluster: CPUs per trial
    cpus_per_trial: int | None = None  # default: all of num_cpus (one trial at a time)
    address: str | None = None
    # how long a run on a cluster waits for a free trial slot before saying why it cannot go on
    cluster_wait_s: float = 300.0


# -- job directory (driver side) ---------------------------------------------------------------

def write_job(directory: Path, model_spec: str, windows: torch.Tensor, reference,
              threads: int, calib: torch.Tensor | None = None, mode: str = "sequential",
              gptq: GPTQSettings = GPTQSettings(),
              placement: dict[str, str] | None = None) -> None:
    """Windows, the reference per window (what its ReferenceCache keeps: the head's input,
    a few MB), the calibration windows and how candidates are built (``mode``, ``gptq``)."""
    directory.mkdir(parents=True, exist_ok=True)
    described = directory / "job.json"
    if not described.is_file() or "mode" not in json.loads(described.read_text()):
        # (no "mode": a job of an earlier version, whose candidates were weight files)
        save_file({"windows": windows.cpu().contiguous()}, str(directory / "windows.safetensors"))
        if calib is not None:
            save_file({"calib": calib.cpu().contiguous()}, str(directory / "calib.safetensors"))
        for i in range(windows.shape[0]):
            save_file({k: v.cpu().contiguous() for k, v in reference.saved(i).items()},
                      str(directory / f"reference_{i}.safetensors"))
    # rewritten every time (the rest is reused): a resumed run's workers load the model where
    # this run computes
    atomic_write_text(directory / "job.json", json.dumps(
        {"model": model_spec, "windows": int(windows.shape[0]), "threads": threads,
         "mode": mode, "gptq": dataclasses.asdict(gptq),
         "placement": placement or {"device": "cpu", "dtype": "float32"}}))


def write_candidate(directory: Path, name: str, configs: dict[str, LayerConfig]) -> None:
    """A candidate is its plan: every layer's config (the worker builds the weights)."""
    path = directory / "candidates" / f"{name}.json"
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({layer: cfg.to_dict() for layer, cfg in configs.items()}))


# -- trial (worker side) -----------------------------------------------------------------------

_WORKER: dict = {}


def _worker_state(job_dir: Path, job: dict, threads: int):
    """The worker's model (loaded once per worker) and the job's reference, made from the
    saved hidden states through the model's own, uncompressed head."""
    from ..compress.apply import IN_PLACE
    from ..evaluate import ReferenceCache

    stale = "loaded" in _WORKER and getattr(_WORKER["loaded"].model, IN_PLACE, False)
    placement = job.get("placement", {"device": "cpu", "dtype": "float32"})
    spec = (job["model"], placement["device"], placement["dtype"])
    if _WORKER.get("spec") != spec or stale:  # stale: a trial stopped mid-build
        from ..model import load_model
        from ..peak_memory import bound_heap

        bound_heap()
        _WORKER.clear()
        torch.set_num_threads(threads)
        _WORKER.update(spec=spec, loaded=load_model(job["model"], **placement))
    if _WORKER.get("job") != (str(job_dir), job):
        windows = load_file(str(job_dir / "windows.safetensors"))["windows"]
        saved = [load_file(str(job_dir / f"reference_{i}.safetensors"))
                 for i in range(job["windows"])]
        reference = ReferenceCache.from_saved(_WORKER["loaded"].model, windows, saved)
        _WORKER.update(job=(str(job_dir), job), windows=windows, reference=reference)
    return _WORKER["loaded"], _WORKER["windows"], _WORKER["reference"]


def evaluate_candidate(config: dict) -> None:
    """A Ray Tune function trainable: build one candidate from its plan, as the search's final
    meter and ``apply`` build it, into the worker's model, and evaluate it window by window."""
    import ray
    from ray import tune

    from ..compress.apply import compressed_in_place, uses_calibration
    from ..evaluate import log_probs, window_sums
    from ..peak_memory import peak_rss_bytes, return_freed_memory

    job_dir = Path(config["job_dir"])
    job = json.loads((job_dir / "job.json").read_text())
    node = ray.get_runtime_context().get_node_id()  # in each report: which machine measured it
    loaded, windows, reference = _worker_state(job_dir, job,
                                               int(config.get("threads") or job["threads"]))
    raw = json.loads((job_dir / "candidates" / f"{config['candidate']}.json").read_text())
    configs = {layer: LayerConfig.from_dict(cfg) for layer, cfg in raw.items()}
    calib_file = job_dir / "calib.safetensors"
    calib = load_file(str(calib_file))["calib"] if calib_file.is_file() and \
        uses_calibration(configs.values()) else None
    state = {"next": 0, "nll": 0.0, "kl": 0.0, "tokens": 0}
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # restored after an interruption: continue where it stopped
        with checkpoint.as_directory() as path:
            state = json.loads((Path(path) / "state.json").read_text())
    return_freed_memory()  # the previous candidate's temporaries, before this one's
    with compressed_in_place(loaded, configs, calib, mode=job["mode"], progress=False,
                             gptq=GPTQSettings(**job["gptq"]), codes=True) as model:
        for i in range(state["next"], job["windows"]):
            with torch.no_grad():
                nll, kl, tokens = window_sums(log_probs(model, windows[i]), windows[i],
                                              reference.get(i))
            state = {"next": i + 1, "nll": state["nll"] + nll, "kl": state["kl"] + kl,
                     "tokens": state["tokens"] + tokens}
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "state.json").write_text(json.dumps(state))
                tune.report({"kl": state["kl"] / state["tokens"],
                             "ppl": math.exp(state["nll"] / state["tokens"]),
                             "tokens": state["tokens"], "windows": i + 1,
                             "peak_rss_bytes": peak_rss_bytes(), "node": node},
                            checkpoint=tune.Checkpoint.from_directory(tmp))


# -- experiment (driver side) ------------------------------------------------------------------

def _progress_bar(n_candidates: int, windows: int):
    """A Tune callback: evaluated windows over all candidates on a tqdm bar (a candidate ASHA
    stops counts as done). Built here so that importing this module does not import Ray."""
    from ray import tune
    from tqdm import tqdm

    class ProgressBar(tune.Callback):
        def __init__(self):
            self._bar = None
            self.seen: dict[str, int] = {}

        @property
        def bar(self):  # made on first use: Tune pickles its callbacks with the experiment
            if self._bar is None:
                self._bar = tqdm(total=n_candidates * windows, desc="level 3 (ray tune)",
                                 leave=False)
            return self._bar

        def __getstate__(self):
            return {**self.__dict__, "_bar": None}

        def _advance(self, trial, done: int) -> None:
            step = done - self.seen.get(trial.trial_id, 0)
            if step > 0:
                self.seen[trial.trial_id] = done
                self.bar.update(step)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self._advance(trial, int(result.get("windows", 0)))
            self.bar.set_postfix(kl=f"{result.get('kl', float('nan')):.4f}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._advance(trial, windows)

        def on_experiment_end(self, trials, **info):
            self.bar.close()

    return ProgressBar()


def _fault_point():
    """A Tune callback for the fault drill: the driver passes ``level3_result`` at each trial
    result it receives, so a test can kill it with trials half-measured (a kill timed from
    outside lands there only by luck: on the tiny model level 3 lasts a fraction of a
    second)."""
    from ray import tune

    class FaultPoint(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            faults.point("level3_result")

    return FaultPoint()


@contextlib.contextmanager
def _without_missing_files_warnings():
    """Tune's results (loaded when an experiment is restored, and when it ends) warn "Failed to
    fetch metrics ... FileNotFoundError" for a trial whose result files a killed driver never
    flushed, which reads as lost work on a resume.
    Nothing is lost: level 3's figures are each trial's last result, kept in the experiment's
    state, and a trial without one stops the search below."""
    analysis_log = logging.getLogger("ray.tune.analysis.experiment_analysis")

    def quiet(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to fetch metrics")

    analysis_log.addFilter(quiet)
    try:
        yield
    finally:
        analysis_log.removeFilter(quiet)


def run_level3(job_dir: Path, candidates: list[str], settings: Level3Settings,
               tokens_per_window: int, resume: bool = False, log=print,
               progress: bool = True) -> dict[str, dict]:
    """Evaluate ``candidates`` (names of files in the job directory); returns per candidate its
    last report (kl, ppl, tokens, windows), whether ASHA stopped it early, and the peak
    resident memory of the worker that measured it."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # An interrupt reaches the driver as KeyboardInterrupt, as everywhere else in the search
    # (Tune's own handler would print its lines and return a half-measured grid); the
    # experiment's saved state is what --resume restores, as after a kill.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    start_ray(settings.num_cpus, settings.address)
    if settings.address:  # a cluster: as many trials at once as its CPUs hold
        cpus = settings.cpus_per_trial or settings.num_cpus or 1
        slots = int(ray.cluster_resources().get("CPU", cpus)) // cpus
        wait_for_cpus(cpus, settings.address, settings.cluster_wait_s, log)
    else:
        cpus = settings.cpus_per_trial or settings.num_cpus or os.cpu_count()
        slots = (settings.num_cpus or os.cpu_count()) // cpus
    job = json.loads((job_dir / "job.json").read_text())
    on_gpu = job.get("placement", {}).get("device") == "cuda"
    trainable = tune.with_resources(evaluate_candidate, {"cpu": cpus, "gpu": 1 if on_gpu else 0})
    callbacks = [_progress_bar(len(candidates), job["windows"])] if progress else []
    callbacks.append(_fault_point())
    storage = str(job_dir.resolve())
    experiment = Path(storage) / EXPERIMENT
    max_t = job["windows"] * tokens_per_window
    if resume and tune.Tuner.can_restore(str(experiment)):
        log("level 3: restoring the Ray Tune experiment")
        with _without_missing_files_warnings():  # it loads the killed run's results
            tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True,
                                       resume_errored=True)
    else:
        if experiment.exists():
            import shutil

            shutil.rmtree(experiment)  # an unfinished experiment without --resume: start over
        tuner = tune.Tuner(
            trainable,
            param_space={"job_dir": str(job_dir.resolve()), "threads": cpus,
                         "candidate": tune.grid_search(candidates)},
            tune_config=tune.TuneConfig(
                metric="kl", mode="min", max_concurrent_trials=max(1, slots),
                # a worker measures candidate after candidate with the model it loaded once
                # (_worker_state); Ray's default starts a process, torch and the model per
                # candidate. A trial stopped mid-build leaves its thread running: Ray then
                # refuses the reset and starts a fresh worker
                reuse_actors=True,
                scheduler=ASHAScheduler(time_attr="tokens", max_t=max_t,
                                        grace_period=settings.grace_windows * tokens_per_window,
                                        reduction_factor=settings.reduction_factor)),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=storage, verbose=0,
                                      callbacks=callbacks,
                                      failure_config=tune.FailureConfig(max_failures=1),
                                      # every checkpoint kept (a few bytes each): with
                                      # num_to_keep=1 a kill between deleting the old one and
                                      # saving the state leaves the state naming a deleted one
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=None)))
    with _without_missing_files_warnings():
        results = tuner.fit()
    out = {}
    for result in results:
        if result.error is not None:
            raise AutocompressError(f"level 3 trial failed: {result.error}")
        metrics = result.metrics or {}
        if "kl" not in metrics:
            # Tune's own SIGINT handler stops the experiment cleanly (its state saved for
            # --resume) and returns; the driver must still stop as on any interrupt
            raise KeyboardInterrupt("level 3 stopped before every candidate reported")
        name = result.config["candidate"]
        out[name] = {"kl": metrics["kl"], "ppl": metrics["ppl"], "tokens": metrics["tokens"],
                     "windows": metrics["windows"],
                     "stopped_early": metrics["windows"] < job["windows"],
                     "peak_rss_bytes": metrics.get("peak_rss_bytes")}
    return out
