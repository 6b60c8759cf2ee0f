"""--compute-device and --dtype: parsed with clear errors, honoured by every stage.

The guard test runs each stage on a tiny model moved to the ``meta`` device under a dispatch
mode that records every operation touching a float tensor on another device: a stage that
allocates on the CPU (``torch.zeros(n)`` without ``device=``), or copies weights there, fails it
exactly as it would fail (or silently crawl) with the model on a GPU. Token windows are CPU
integers that stages index and send to the model's device; that is allowed.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from autocompress.errors import AutocompressError
from autocompress.placement import (Placement, parse_device, parse_dtype, resolve_placement,
                                    stored_dtype)
from autocompress.plan import LayerConfig


# -- parsing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("gpu", "unknown compute device 'gpu'"),
    ("cuda:x", "unknown compute device"),
    ("tpu:0", "unknown compute device"),
])
def test_a_bad_device_string_is_one_clear_error(text, message):
    with pytest.raises(AutocompressError, match=message):
        parse_device(text)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this checks a machine without CUDA")
def test_cuda_without_cuda_says_so_and_what_to_use():
    with pytest.raises(AutocompressError, match="sees no CUDA device.*--compute-device cpu"):
        parse_device("cuda:0")


def test_a_bad_dtype_names_the_choices():
    with pytest.raises(AutocompressError, match="unknown dtype 'fp8'.*bfloat16"):
        parse_dtype("fp8")


def test_auto_is_float32_on_the_cpu_and_the_stored_dtype_on_a_gpu(tmp_path):
    (tmp_path / "config.json").write_text('{"torch_dtype": "bfloat16"}')
    assert stored_dtype(tmp_path) == torch.bfloat16
    cpu = resolve_placement("cpu", "auto", torch.bfloat16)
    assert cpu == Placement(torch.device("cpu"), torch.float32)
    assert resolve_placement("cpu", "bfloat16").dtype == torch.bfloat16
    if not torch.cuda.is_available():
        assert resolve_placement("auto", "auto", torch.bfloat16).device.type == "cpu"
    else:
        assert resolve_placement("auto", "auto", torch.bfloat16) == Placement(
            torch.device("cuda"), torch.bfloat16)


def test_load_model_in_bfloat16_runs_an_evaluation_close_to_float32(tiny_model_dir):
    from autocompress.evaluate import evaluate
    from autocompress.model import load_model

    bf16 = load_model(str(tiny_model_dir), dtype="bfloat16")
    f32 = load_model(str(tiny_model_dir))
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert bf16.placement.describe() == "cpu, bfloat16"
    windows = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    a, b = evaluate(bf16.model, windows, progress=False), evaluate(f32.model, windows,
                                                                     progress=False)
    # the same model in another precision: perplexity within bf16's rounding, not equal
    assert a.ppl == pytest.approx(b.ppl, rel=0.02)
    assert a.ppl != b.ppl


# -- every stage computes where the model is ---------------------------------------------------

# Where a stage moves data onto the model's device on purpose, from a file: reading a file
# makes CPU tensors first (statistics taken once and kept on disk, read back per layer).
DELIBERATE_UPLOADS = {("stats_store.py", "_read")}


def _uploading() -> bool:
    return any((frame.filename.rsplit("/", 1)[-1], frame.name) in DELIBERATE_UPLOADS
               for frame in traceback.extract_stack())


class _DeviceGuard(TorchDispatchMode):
    """Records operations that touch a float tensor off ``device`` (but for the deliberate
    uploads above). On ``meta`` (no data) it answers the few questions a stage asks of values:
    scalars, ``equal``, ``allclose``, a copy to the CPU of an index tensor (``tolist``)."""

    def __init__(self, device: str):
        super().__init__()
        self.device = torch.device(device)
        self.offenders: dict[str, str] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if first is not None and first.device.type == "meta":
            if func is torch.ops.aten._local_scalar_dense.default:
                return True if first.dtype == torch.bool else (
                    0.5 if first.dtype.is_floating_point else 0)
            if func is torch.ops.aten.equal.default:
                return False
            if func is torch.ops.aten.allclose.default:
                return True
            if func is torch.ops.aten._to_copy.default and str(kwargs.get("device")) == "cpu":
                return torch.zeros(first.shape, dtype=kwargs.get("dtype") or first.dtype)
        out = func(*args, **kwargs)
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        if any(t.device != self.device and t.dtype.is_floating_point and t.dim() > 0
               for t in tensors) and not _uploading():
            self.offenders.setdefault(str(func), "".join(traceback.format_stack(limit=6)[:-1]))
        return out


@pytest.fixture(scope="module")
def meta_loaded(tiny_model_dir):
    from autocompress.model import load_model

    loaded = load_model(str(tiny_model_dir))
    loaded.model.to("meta")
    return loaded


WINDOWS = torch.randint(3, 100, (3, 16), generator=torch.Generator().manual_seed(1))
PLANS = {
    "rtn": LayerConfig(bits=4),
    "gptq": LayerConfig(bits=3, method="gptq"),
    "low rank": LayerConfig(bits=4, rank_ratio=0.5),
    "wanda": LayerConfig(bits=16, sparsity=0.5, prune_method="wanda"),
    "2:4": LayerConfig(bits=8, sparsity=0.5, pattern="2:4"),
}


def _stages():
    from autocompress.compress.apply import compressed_in_place
    from autocompress.compress.calibration import collect_stats
    from autocompress.evaluate import ReferenceCache, evaluate
    from autocompress.search.measure import PlanMeter
    from autocompress.search.space import SearchSpace
    from autocompress.sensitivity import build as table_build
    from autocompress.sensitivity.base import PROXIES

    def stats(loaded):
        collect_stats(loaded.model, loaded.layers, WINDOWS, progress=False)

    def evaluation(loaded):
        evaluate(loaded.model, WINDOWS, ReferenceCache(loaded.model, WINDOWS).fill(),
                 progress=False)

    def table(proxy_name):
        def run(loaded, tmp_path):
            space = SearchSpace([LayerConfig(bits=4), LayerConfig(bits=3, method="gptq"),
                                 LayerConfig(bits=4, rank_ratio=0.5)])
            table_build.build_table(loaded, space, table_build.make_proxy(proxy_name), WINDOWS,
                                    "digest", cache=tmp_path / "table.json", progress=False,
                                    log=lambda m: None)
        return run

    def applied(cfg, mode):
        def run(loaded):
            plan = {layer.name: cfg for layer in loaded.layers}
            stats = None if mode == "sequential" else collect_stats(
                loaded.model, loaded.layers, WINDOWS, progress=False)
            with compressed_in_place(loaded, plan, WINDOWS if stats is None else None,
                                     mode=mode, stats=stats, progress=False) as model:
                evaluate(model, WINDOWS, progress=False)
        return run

    def meter(mode):
        def run(loaded):
            PlanMeter(loaded, WINDOWS, WINDOWS, mode=mode).measure(
                {layer.name: PLANS["gptq"] for layer in loaded.layers})
        return run

    from autocompress.sensitivity import fisher, hessian, hutchinson, measured  # noqa: F401
    stages = {"calibration statistics": stats, "KL evaluation": evaluation}
    stages |= {f"{name} table": table(name) for name in sorted(PROXIES)}
    stages |= {f"apply {name} ({mode})": applied(cfg, mode) for name, cfg in PLANS.items()
               for mode in ("sequential", "parallel")}
    stages |= {f"plan meter ({mode})": meter(mode) for mode in ("sequential", "parallel")}
    return stages


STAGES = _stages()


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_computes_on_the_models_device(stage, meta_loaded, tmp_path, monkeypatch):
    import inspect

    from autocompress.sensitivity import build as table_build

    # the cache key's fingerprint copies a weight sample to the CPU on purpose (the same
    # weights give the same key wherever they are)
    monkeypatch.setattr(table_build, "weights_fingerprint", lambda loaded: "meta")
    run = STAGES[stage]
    guard = _DeviceGuard("meta")
    with guard:
        run(meta_loaded, tmp_path) if len(inspect.signature(run).parameters) == 2 \
            else run(meta_loaded)
    assert not guard.offenders, "\n".join(f"{op}:\n{where}" for op, where in
                                          guard.offenders.items())


def test_the_guard_catches_a_cpu_allocation(meta_loaded):
    """The guard is what the stage test relies on: a stage that builds a CPU tensor and mixes
    it with the model's is caught."""
    guard = _DeviceGuard("meta")
    with guard:
        weight = meta_loaded.module(meta_loaded.layers[0].name).weight
        torch.zeros(weight.shape[1]) + 1.0
    assert guard.offenders


def test_the_torch_gptq_sweep_equals_the_numpy_one():
    """On a GPU GPTQ runs the torch sweep (the numpy one is the CPU's fast path): both must
    give the same codes."""
    from autocompress.compress.gptq import _Grid, _sweep, _sweep_static, \
        _upper_cholesky_of_inverse

    g = torch.Generator().manual_seed(0)
    W = torch.randn(48, 128, generator=g)
    X = torch.randn(512, 128, generator=g) * torch.linspace(0.2, 3, 128)
    H = 2 * X.T @ X / X.shape[0]
    U = _upper_cholesky_of_inverse(H, 0.01)
    group_of_column = [c // 32 for c in range(128)]
    grid = _Grid.start(W, None, 3, 32, False, True)
    codes_np, loss_np = _sweep_static(W.clone(), U, None, grid, group_of_column, 64)
    codes_t, loss_t = _sweep(W.clone(), U, None, grid, group_of_column, 64)
    assert (codes_np != codes_t).float().mean() < 1e-3
    assert loss_t == pytest.approx(loss_np, rel=1e-4)
