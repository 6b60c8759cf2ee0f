"""Level 2 on Ray workers: the same trials with one worker as with two, each plan's KL the
in-process meter's."""

import dataclasses

import pytest
import torch

from autocompress.accounting import model_footprint
from autocompress.data import calibration_data
from autocompress.plan import LayerConfig
from autocompress.search.engine import SearchSettings, run_search
from autocompress.search.measure import PlanMeter
from autocompress.search.space import SearchSpace, spaces_dir


@pytest.fixture
def ray_session():
    import ray

    yield
    ray.shutdown()


def _trials(result):
    return [(t.params, t.user_attrs["kl_fast"], t.user_attrs["signature"]) for t in
            sorted(result.trials, key=lambda t: t.number)]


def test_one_worker_and_two_ask_and_measure_the_same_trials(tiny_loaded, tmp_path,
                                                             ray_session):
    import ray

    space = SearchSpace.from_yaml(str(spaces_dir() / "joint.yaml"))
    budget = model_footprint(tiny_loaded, {l.name: LayerConfig(bits=3)
                                           for l in tiny_loaded.layers}, context=256).total
    runs = {}
    for workers in (1, 2):
        settings = SearchSettings(budget=budget, context=256, n_calib=2, n_holdout=2,
                                  window_len=64, trials=6, fast_windows=1, num_cpus=2,
                                  level2_workers=workers, level2_batch=2)
        runs[workers] = run_search(tiny_loaded, space, settings, out_dir=tmp_path / str(workers),
                                   progress=False, log=lambda m: None)
        ray.shutdown()
    one, two = _trials(runs[1]), _trials(runs[2])
    assert len(one) == 6 and one == two
    assert len({signature for _, _, signature in one}) > 1  # the trials differ among themselves
    chosen = [{k: v for k, v in run.plan.to_dict().items() if k != "figures"}
              for run in runs.values()]
    assert chosen[0] == chosen[1]
    assert runs[1].chosen.measured == runs[2].chosen.measured


def test_a_worker_measures_a_plan_as_the_meter_in_this_process_does(tiny_loaded, ray_session):
    from autocompress.search.meter_pool import MeterPool

    calib = calibration_data(tiny_loaded.tokenizer, None, 2, 1, 64)
    names = [l.name for l in tiny_loaded.layers]
    plan = {n: LayerConfig(bits=3, group_size=32, method="gptq") for n in names}
    plan[names[1]] = LayerConfig(bits=8, rank_ratio=0.5)
    torch.set_num_threads(1)
    try:
        here = PlanMeter(tiny_loaded, calib.holdout, calib.calib).measure(plan)["kl"]
    finally:
        torch.set_num_threads(2)
    pool = MeterPool(str(tiny_loaded.source), calib.holdout, calib.calib,
                     PlanMeter(tiny_loaded, calib.holdout, None).gptq, {}, None, workers=1,
                     num_cpus=1)
    try:
        assert pool.measure_many([plan, plan]) == pytest.approx([here, here], rel=1e-6)
    finally:
        pool.close()


def test_workers_load_their_model_where_the_driver_computes(tiny_loaded, tmp_path):
    """A level-2 worker and a level-3 trial load the model with the driver's placement (its
    device type and dtype), not the default float32: their KLs are then the driver's."""
    import json

    from autocompress.compress.weights import GPTQSettings
    from autocompress.evaluate import ReferenceCache
    from autocompress.search.meter_pool import _MeterWorker
    from autocompress.search.tune_level import _WORKER, _worker_state, write_job

    placement = {"device": "cpu", "dtype": "bfloat16"}
    calib = calibration_data(tiny_loaded.tokenizer, None, 2, 1, 64)
    worker = _MeterWorker(str(tiny_loaded.source), calib.holdout, None,
                          dataclasses.asdict(GPTQSettings()), {}, None, 1, placement)
    assert worker.meter.loaded.placement.dtype == torch.bfloat16
    torch.set_num_threads(2)

    write_job(tmp_path, str(tiny_loaded.source), calib.holdout,
              ReferenceCache(tiny_loaded.model, calib.holdout), threads=1, placement=placement)
    job = json.loads((tmp_path / "job.json").read_text())
    assert job["placement"] == placement
    _WORKER.clear()
    try:
        loaded, _, _ = _worker_state(tmp_path, job, threads=2)
        assert loaded.placement.dtype == torch.bfloat16
        del job["placement"]  # a job written before placements: float32 on the CPU
        loaded, _, _ = _worker_state(tmp_path, job, threads=2)
        assert loaded.placement.dtype == torch.float32
    finally:
        _WORKER.clear()
