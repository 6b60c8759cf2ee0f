"""Brute-force references for the Hessian and Hutchinson proxies, and the table builder's
resume and cache invalidation, on the tiny random Llama."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from autocompress.search.space import SearchSpace
from autocompress.sensitivity.base import SensitivityProxy
from autocompress.sensitivity.build import TableCache, build_table
from autocompress.sensitivity.fisher import gradients_for
from autocompress.sensitivity.hessian import HessianProxy, output_fisher
from autocompress.sensitivity.hutchinson import HutchinsonProxy, hutchinson_traces
from autocompress.sensitivity.measured import MeasuredProxy


def _windows(loaded, n, length, seed=0):
    return torch.randint(0, loaded.model.config.vocab_size, (n, length),
                         generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _self_sampled(model, n, length, seed=0):
    """Windows drawn from the model itself: labels then follow the model's distribution, so the
    empirical Fisher matches the true Fisher (the KL's curvature) on average."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (n, 1), generator=g)
    for _ in range(length - 1):
        p = torch.softmax(model(ids, use_cache=False).logits[:, -1].float(), dim=-1)
        ids = torch.cat([ids, torch.multinomial(p, 1, generator=g)], dim=1)
    return ids


def _layer(loaded, block, kind):
    return next(x for x in loaded.layers if x.block == block and x.kind == kind)


# -- Hessian proxy ---------------------------------------------------------------------------

def _retain_grad_output_fisher(model, layers, windows):
    """s_i = E_w[Σ_t (∂L_w/∂y_{t,i})²], by retain_grad on each layer's output, one window at
    a time (no backward hooks)."""
    sums = {x.name: torch.zeros(x.out_features, dtype=torch.float64) for x in layers}
    emb = model.get_input_embeddings().weight
    for w in windows:
        outputs = {}

        def keep(name):
            def hook(_module, _args, out):
                out.retain_grad()
                outputs[name] = out
            return hook

        handles = [model.get_submodule(x.name).register_forward_hook(keep(x.name)) for x in layers]
        try:
            emb.requires_grad_(True)
            model(w[None], labels=w[None], use_cache=False).loss.backward()
        finally:
            emb.requires_grad_(False)
            emb.grad = None
            for h in handles:
                h.remove()
        for name, out in outputs.items():
            sums[name] += out.grad[0].double().square().sum(dim=0)
    return {name: s / windows.shape[0] for name, s in sums.items()}


def _captured_inputs(model, layer, windows):
    """Every token's input x_t of ``layer`` over ``windows``, [T, in]."""
    xs = []
    handle = model.get_submodule(layer.name).register_forward_pre_hook(
        lambda _m, args: xs.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    try:
        with torch.no_grad():
            for w in windows:
                model(w[None], use_cache=False)
    finally:
        handle.remove()
    return torch.cat(xs).double()


def test_hessian_channel_weights_equal_retain_grad_reference(tiny_loaded):
    model = tiny_loaded.model
    layers = [_layer(tiny_loaded, 0, "q"), _layer(tiny_loaded, 0, "k"),
              _layer(tiny_loaded, 1, "down"), _layer(tiny_loaded, 1, "o")]
    windows = _windows(tiny_loaded, 3, 16)
    got = output_fisher(tiny_loaded, layers, windows, progress=False)
    expected = _retain_grad_output_fisher(model, layers, windows)
    for x in layers:
        assert torch.allclose(got[x.name].double(), expected[x.name], rtol=1e-4, atol=1e-14), x.name
        assert float(expected[x.name].sum()) > 0
    assert not any(p.requires_grad for p in model.parameters())


def test_hessian_cost_equals_explicit_output_error_sum(tiny_loaded):
    """cost = ½ T Σ_i s_i E_t[(ΔW x_t)_i²] (T predicted tokens per window), with x_t captured
    explicitly and the output errors formed token by token, equals ½ T Σ_i s_i (ΔW H ΔWᵀ)_ii."""
    model = tiny_loaded.model
    layers = [_layer(tiny_loaded, 0, "v"), _layer(tiny_loaded, 1, "down")]
    windows = _windows(tiny_loaded, 3, 16, seed=1)
    proxy = HessianProxy()
    proxy.prepare(tiny_loaded, windows, layers, progress=False)
    s = _retain_grad_output_fisher(model, layers, windows)
    g = torch.Generator().manual_seed(0)
    for x in layers:
        weight = model.get_submodule(x.name).weight.detach().float()
        deltas = [0.1 * torch.randn(weight.shape, generator=g) for _ in range(3)]
        got = proxy.layer_costs(x, weight, deltas)
        inputs = _captured_inputs(model, x, windows)  # [T_all, in]
        tokens = windows.shape[1] - 1
        for d, cost in zip(deltas, got):
            errors = inputs @ d.double().T  # δy_t = ΔW x_t for every token, [T_all, out]
            expected = 0.5 * tokens * float((s[x.name] * errors.square().mean(dim=0)).sum())
            assert cost == pytest.approx(expected, rel=1e-4), x.name


def test_hessian_cost_tracks_measured_kl_in_scale(tiny_loaded):
    """For small perturbations on self-sampled windows the second-order Hessian proxy predicts
    the measured KL's size (it was ~T = 15 times too small without the factor T)."""
    windows = _self_sampled(tiny_loaded.model, 32, 16)
    layers = [_layer(tiny_loaded, 0, "down"), _layer(tiny_loaded, 1, "down"),
              _layer(tiny_loaded, 1, "v")]
    hessian, measured = HessianProxy(), MeasuredProxy()
    hessian.prepare(tiny_loaded, windows, layers, progress=False)
    measured.prepare(tiny_loaded, windows, layers, progress=False)
    g = torch.Generator().manual_seed(3)
    predicted, actual = 0.0, 0.0
    for x in layers:
        weight = tiny_loaded.module(x.name).weight.detach().float()
        d = [0.3 * weight.std() * torch.randn(weight.shape, generator=g)]
        predicted += hessian.layer_costs(x, weight, d)[0]
        actual += measured.layer_costs(x, weight, d)[0]
    assert actual > 0
    assert 0.5 < predicted / actual < 2.0


# -- Hutchinson proxy ------------------------------------------------------------------------

def _exact_hessians(model, layer, windows):
    """The exact Hessian of each window's loss w.r.t. ``layer``'s weight, [w, n, n], from one
    Hessian-vector product per basis vector (batched)."""
    weight = model.get_submodule(layer.name).weight
    n = weight.numel()
    out = []
    with gradients_for(model, [weight]), sdpa_kernel(SDPBackend.MATH):
        for w in windows:
            loss = model(w[None], labels=w[None], use_cache=False).loss
            (grad,) = torch.autograd.grad(loss, weight, create_graph=True)
            rows = []
            for basis in torch.eye(n).reshape(n, *weight.shape).split(512):
                (hv,) = torch.autograd.grad(grad, weight, grad_outputs=basis,
                                            is_grads_batched=True, retain_graph=True)
                rows.append(hv.reshape(len(basis), n).double())
            out.append(torch.cat(rows))
    return torch.stack(out)


@pytest.fixture(scope="module")
def hutchinson_case(tiny_loaded):
    """v_proj of the last block (32 × 64 = 2048 weights), two windows, exact Hessians."""
    layer = _layer(tiny_loaded, 1, "v")
    windows = _windows(tiny_loaded, 2, 12, seed=2)
    previous = torch.get_num_threads()  # module scope: set up before the autouse fixture
    torch.set_num_threads(1)
    try:
        hessians = _exact_hessians(tiny_loaded.model, layer, windows)
    finally:
        torch.set_num_threads(previous)
    return layer, windows, hessians


def test_hutchinson_uses_exact_hessian_vector_products(tiny_loaded, hutchinson_case):
    """With the estimator's own probe vectors, the estimate is exactly mean vᵀ H_w v."""
    layer, windows, hessians = hutchinson_case
    assert torch.allclose(hessians, hessians.transpose(1, 2), atol=1e-5 * hessians.abs().max())
    probes, seed = 4, 7
    got = hutchinson_traces(tiny_loaded, [layer], windows, probes=probes, seed=seed,
                            progress=False)[layer.name]
    g = torch.Generator().manual_seed(seed)
    shape = tiny_loaded.module(layer.name).weight.shape
    total = 0.0
    for i in range(windows.shape[0]):
        for _ in range(probes):
            v = (torch.randint(0, 2, shape, generator=g).float() * 2 - 1).reshape(-1).double()
            total += float(v @ hessians[i] @ v)
    expected = total / (windows.shape[0] * probes)
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-6 * float(hessians.abs().sum(2).max()))


def test_hutchinson_trace_estimate_within_its_error_of_exact_trace(tiny_loaded, hutchinson_case):
    """64 probes (2 windows × 32): within 4 standard errors of the exact trace, the error taken
    from the exact Hessians (Var vᵀHv = 2 Σ_{i≠j} H_ij² for Rademacher v)."""
    layer, windows, hessians = hutchinson_case
    probes = 32
    diag = hessians.diagonal(dim1=1, dim2=2)
    exact = float(diag.sum(-1).mean())
    off = hessians.square().sum((1, 2)) - diag.square().sum(-1)
    std_error = float((2 * off).sum().sqrt()) / (windows.shape[0] * probes ** 0.5)
    assert 4 * std_error < 0.5 * abs(exact)  # the check below has the power to see a factor 2
    got = hutchinson_traces(tiny_loaded, [layer], windows, probes=probes, seed=0,
                            progress=False)[layer.name]
    assert abs(got - exact) < 4 * std_error


def _hutchinson_by_autograd_grad(model, layers, windows, seed):
    """The estimator written plainly: every gradient, probe and product at once, through
    ``autograd.grad`` (the same probes: signs drawn per window in the layers' order)."""
    params = [model.get_submodule(x.name).weight for x in layers]
    generator = torch.Generator().manual_seed(seed)
    sums = [0.0] * len(params)
    with gradients_for(model, params), sdpa_kernel(SDPBackend.MATH):
        for w in windows:
            vs = [torch.randint(0, 2, p.shape, generator=generator, dtype=torch.int8).float()
                  * 2 - 1 for p in params]
            loss = model(w[None], labels=w[None], use_cache=False).loss
            grads = torch.autograd.grad(loss, params, create_graph=True)
            hvs = torch.autograd.grad(grads, params, grad_outputs=vs)
            for k, (v, hv) in enumerate(zip(vs, hvs)):
                sums[k] += float((v * hv).sum())
    return {x.name: s / windows.shape[0] for x, s in zip(layers, sums)}


def test_lean_hutchinson_is_the_plain_estimator_over_many_layers(tiny_loaded):
    """Over every layer at once (cross-layer terms included), the lean double backward (each
    gradient and product consumed as it arrives) gives the plain ``autograd.grad`` estimate."""
    layers = tiny_loaded.layers
    windows = _windows(tiny_loaded, 2, 12, seed=5)
    got = hutchinson_traces(tiny_loaded, layers, windows, seed=3, progress=False)
    expected = _hutchinson_by_autograd_grad(tiny_loaded.model, layers, windows, seed=3)
    scale = max(abs(v) for v in expected.values())
    assert scale > 0
    for x in layers:
        assert got[x.name] == pytest.approx(expected[x.name], rel=1e-4, abs=1e-5 * scale), x.name
    assert not any(p.requires_grad or p.grad is not None
                   for p in tiny_loaded.model.parameters())


def test_output_gradients_taken_block_by_block_are_the_whole_model_s(tiny_loaded):
    """The Hessian proxy's channel weights from the block-by-block backward equal the whole
    model's backward hooks' (output_fisher), block after block from the last."""
    from autocompress.sensitivity.blockwise import gradient_squares_by_block

    layers = tiny_loaded.layers
    windows = _windows(tiny_loaded, 3, 16, seed=4)
    expected = output_fisher(tiny_loaded, layers, windows, progress=False)
    got, seen = {}, []

    def on_block(index, sums, _stats):
        seen.append(index)
        got.update(sums)

    gradient_squares_by_block(tiny_loaded.model, layers, windows, on_block, "outputs",
                              progress=False)
    assert seen == sorted({x.block for x in layers}, reverse=True)
    assert got.keys() == expected.keys()
    for name, s in expected.items():
        assert float(s.sum()) > 0
        assert torch.allclose(got[name], s, rtol=1e-5, atol=1e-12 * float(s.max())), name
    assert not any(p.requires_grad for p in tiny_loaded.model.parameters())


def test_a_hessian_table_built_block_by_block_is_the_table_built_in_memory(tiny_loaded,
                                                                           tmp_path):
    """The Hessian proxy's table of the joint space (GPTQ, Wanda, low rank: statistics too)
    is the same from its block-by-block preparation as from the whole model's."""
    space = SearchSpace.load("joint")
    windows = _windows(tiny_loaded, 2, 32, seed=6)
    in_memory = HessianProxy()
    in_memory.blockwise = False
    reference = build_table(tiny_loaded, space, in_memory, windows, "test",
                            cache=tmp_path / "memory.json", progress=False)
    blockwise = build_table(tiny_loaded, space, HessianProxy(), windows, "test",
                            cache=tmp_path / "blocks.json", progress=False)
    assert blockwise.layers == reference.layers and blockwise.bytes == reference.bytes
    for name, got, expected in zip(reference.layers, blockwise.cost, reference.cost):
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-9), name
    assert max(max(row) for row in reference.cost) > 0


def test_hutchinson_costs_scale_with_squared_norm(tiny_loaded):
    layer = _layer(tiny_loaded, 1, "down")
    proxy = HutchinsonProxy(probes=1)
    proxy.traces = {layer.name: 3.0}  # prepared elsewhere; the cost is ½ tr/n ‖ΔW‖²
    weight = tiny_loaded.module(layer.name).weight.detach().float()
    g = torch.Generator().manual_seed(0)
    d = torch.randn(weight.shape, generator=g)
    other = torch.randn(weight.shape, generator=g)
    other *= d.norm() / other.norm()
    c1, c2, c3, c_other = proxy.layer_costs(layer, weight, [d, 2 * d, 3 * d, other])
    assert c1 == pytest.approx(0.5 * 3.0 / weight.numel() * float(d.square().sum()), rel=1e-6)
    assert c2 == pytest.approx(4 * c1, rel=1e-6) and c3 == pytest.approx(9 * c1, rel=1e-6)
    assert c_other == pytest.approx(c1, rel=1e-5)
    proxy.traces = {layer.name: -1.0}  # a negative estimate never rewards damage
    assert proxy.layer_costs(layer, weight, [d]) == [0.0]


def test_hutchinson_prepares_on_the_model(tiny_loaded):
    """The full prepare runs (double backward through attention) and restores every flag."""
    layers = [_layer(tiny_loaded, 0, "k"), _layer(tiny_loaded, 1, "up")]
    proxy = HutchinsonProxy(probes=2)
    proxy.prepare(tiny_loaded, _windows(tiny_loaded, 1, 8), layers, progress=False)
    assert set(proxy.traces) == {x.name for x in layers}
    assert not any(p.requires_grad for p in tiny_loaded.model.parameters())
    assert proxy.describe() == {"proxy": "hutchinson", "probes": 2}


# -- the table builder: resume and invalidation ----------------------------------------------

class CountingProxy(SensitivityProxy):
    """cost = ‖ΔW‖² · scale; counts calls; raises after ``fail_after`` layers."""

    name = "counting"

    def __init__(self, scale=1.0, fail_after=None):
        self.scale, self.fail_after = scale, fail_after
        self.calls: list[str] = []
        self.prepared: list[str] = []

    def prepare(self, loaded, windows, layers, progress=True):
        self.prepared = [x.name for x in layers]

    def layer_costs(self, layer, weight, deltas):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("interrupted")
        self.calls.append(layer.name)
        return [self.scale * float(d.square().sum()) for d in deltas]

    def describe(self):
        return {"proxy": self.name, "scale": self.scale}


def _build(loaded, proxy, path, lines, calib="calib-a"):
    return build_table(loaded, SearchSpace.bits_only([2, 4]), proxy,
                       _windows(loaded, 1, 8), calib, cache=path, progress=False,
                       log=lines.append)


def test_interrupted_build_resumes_at_the_next_layer(tiny_loaded, tmp_path):
    path, lines = tmp_path / "table-cache.json", []
    names = [x.name for x in tiny_loaded.layers]
    k = 5
    with pytest.raises(RuntimeError, match="interrupted"):
        _build(tiny_loaded, CountingProxy(fail_after=k), path, lines)
    assert set(json.loads(path.read_text())["rows"]) == set(names[:k])

    resumed = CountingProxy()
    table = _build(tiny_loaded, resumed, path, lines)
    assert resumed.calls == names[k:]  # nothing before layer k is recomputed
    assert resumed.prepared == names[k:]  # and the proxy prepares only what is left
    assert any(f"reusing {k} cached rows" in line for line in lines)

    fresh = _build(tiny_loaded, CountingProxy(), tmp_path / "fresh.json", [])
    assert table.cost == fresh.cost and table.bytes == fresh.bytes

    again = CountingProxy()
    _build(tiny_loaded, again, path, lines)
    assert again.calls == [] and again.prepared == []


class StoppingHutchinson(HutchinsonProxy):
    """Hutchinson, stopped after ``fail_after`` layers; counts its preparations."""

    def __init__(self, fail_after=None):
        super().__init__()
        self.fail_after, self.scored, self.prepares = fail_after, 0, 0

    def prepare(self, *args, **kwargs):
        self.prepares += 1
        super().prepare(*args, **kwargs)

    def rtn_costs(self, *args):
        if self.fail_after is not None and self.scored >= self.fail_after:
            raise RuntimeError("interrupted")
        self.scored += 1
        return super().rtn_costs(*args)


def test_a_resumed_hutchinson_table_is_the_uninterrupted_one(tiny_loaded, tmp_path):
    """The traces (whose estimates depend on which layers share the probes) are kept with the
    rows: the resumed build does not prepare again and its table is the uninterrupted build's,
    not one estimated over the remaining layers only."""
    path, lines = tmp_path / "table-cache.json", []
    with pytest.raises(RuntimeError, match="interrupted"):
        _build(tiny_loaded, StoppingHutchinson(fail_after=5), path, lines)
    resumed = StoppingHutchinson()
    table = _build(tiny_loaded, resumed, path, lines)
    assert resumed.prepares == 0
    assert any("reusing the hutchinson proxy's preparation" in line for line in lines)
    fresh = _build(tiny_loaded, HutchinsonProxy(), tmp_path / "fresh.json", [])
    assert table.cost == fresh.cost
    # a preparation that does not cover the layers left is taken again
    data = json.loads(path.read_text())
    data["rows"] = {}
    del data["prepared"]["traces"][tiny_loaded.layers[-1].name]
    path.write_text(json.dumps(data))
    again = StoppingHutchinson()
    _build(tiny_loaded, again, path, [])
    assert again.prepares == 1


def test_cache_for_other_inputs_is_rebuilt_with_a_line(tiny_loaded, tmp_path):
    path, lines = tmp_path / "table-cache.json", []
    first = _build(tiny_loaded, CountingProxy(scale=1.0), path, lines)
    n = len(tiny_loaded.layers)

    other_proxy, lines = CountingProxy(scale=2.0), []
    table = _build(tiny_loaded, other_proxy, path, lines)
    assert len(other_proxy.calls) == n
    assert any("other inputs" in line and "rebuilding" in line for line in lines)
    assert table.cost[0][0] == pytest.approx(2 * first.cost[0][0])
    assert json.loads(path.read_text())["key"]["scale"] == 2.0

    other_calib, lines = CountingProxy(scale=2.0), []
    _build(tiny_loaded, other_calib, path, lines, calib="calib-b")
    assert len(other_calib.calls) == n
    assert any("other inputs" in line for line in lines)


def test_corrupt_cache_is_rebuilt_with_a_line(tiny_loaded, tmp_path):
    path, lines = tmp_path / "table-cache.json", []
    path.write_text('{"key": {"proxy": "counting"}, "rows": ')  # cut short mid-write
    proxy = CountingProxy()
    _build(tiny_loaded, proxy, path, lines)
    assert len(proxy.calls) == len(tiny_loaded.layers)
    assert any("corrupt" in line for line in lines)
    assert isinstance(TableCache(path, json.loads(path.read_text())["key"]).rows, dict)


@pytest.mark.parametrize("proxy_cls", [HessianProxy, HutchinsonProxy,
                                       __import__("autocompress.sensitivity.fisher",
                                                  fromlist=["FisherProxy"]).FisherProxy],
                         ids=lambda c: c.name)
def test_rtn_fast_path_scores_as_the_delta_path(tiny_loaded, proxy_cls):
    """build_table scores plain RTN options with quant_error_many: the same costs as their ΔW."""
    from autocompress.compress.weights import compress_weight
    from autocompress.plan import LayerConfig
    from autocompress.sensitivity.build import is_plain_rtn, layer_costs

    layers = [_layer(tiny_loaded, 0, "q"), _layer(tiny_loaded, 1, "down")]
    proxy = proxy_cls()
    proxy.prepare(tiny_loaded, _windows(tiny_loaded, 2, 32), layers, progress=False)
    if isinstance(proxy, HutchinsonProxy):  # a noisy trace may be floored to 0: pin one
        proxy.traces = {layer.name: 3.0 for layer in layers}
    options = [LayerConfig(bits=b, group_size=g, sym=sym)
               for b, g, sym in [(2, 32, False), (3, 64, True), (4, -1, False), (8, 128, False)]]
    options += [LayerConfig(bits=4, sparsity=0.5, prune_method="magnitude"),
                LayerConfig(bits=4, rank_ratio=0.5), LayerConfig(bits=16)]
    assert [is_plain_rtn(o) for o in options] == [True] * 4 + [False] * 3
    for layer in layers:
        weight = tiny_loaded.module(layer.name).weight.detach().float()
        deltas = [compress_weight(weight, cfg).weight() - weight for cfg in options]
        slow = proxy.layer_costs(layer, weight, deltas)
        fast = layer_costs(proxy, layer, weight, options, None)
        assert fast == pytest.approx(slow, rel=1e-4, abs=1e-12)
        assert len(set(fast)) == len(fast)  # every option scored for itself, in its place
