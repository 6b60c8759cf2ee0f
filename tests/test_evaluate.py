import math

import torch

from autocompress.evaluate import ReferenceCache, evaluate


def _windows(tiny_loaded, n=3, length=32):
    torch.manual_seed(0)
    return torch.randint(0, tiny_loaded.model.config.vocab_size, (n, length))


def test_perplexity_is_exp_of_mean_next_token_loss(tiny_loaded):
    model, windows = tiny_loaded.model, _windows(tiny_loaded)
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.item() for w in windows]
    result = evaluate(model, windows, progress=False)
    assert result.tokens == 3 * 31
    assert math.isclose(result.nll, sum(losses) / 3, rel_tol=1e-5)  # equal windows: mean of means
    assert math.isclose(result.ppl, math.exp(result.nll), rel_tol=1e-9)
    assert result.kl is None
    # each window's own loss, in order (paired comparisons of plans read them)
    assert len(result.window_nll) == 3
    for mine, theirs in zip(result.window_nll, losses):
        assert math.isclose(mine, theirs, rel_tol=1e-5)
    assert result.as_dict()["window_nll"] == result.window_nll


def test_kl_zero_to_itself_and_positive_to_another_model(tiny_loaded, tiny_model_dir):
    import copy

    model, windows = tiny_loaded.model, _windows(tiny_loaded)
    assert abs(evaluate(model, windows, model, progress=False).kl) < 1e-6
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(0.5)
    direct = evaluate(other, windows, model, progress=False)
    cached = evaluate(other, windows, ReferenceCache(model, windows), progress=False)
    assert direct.kl > 1e-5
    assert math.isclose(direct.kl, cached.kl, rel_tol=1e-4)
    # each window's own KL, in order, from torch's kl_div (equal windows: their mean is kl)
    with torch.no_grad():
        for mine, window in zip(direct.window_kl, windows):
            ref = torch.log_softmax(model(window[None]).logits[0, :-1], -1)
            own = torch.log_softmax(other(window[None]).logits[0, :-1], -1)
            theirs = torch.nn.functional.kl_div(own, ref, log_target=True,
                                                reduction="batchmean").item()
            assert math.isclose(mine, theirs, rel_tol=1e-4)
    assert len(direct.window_kl) == 3
    assert math.isclose(sum(direct.window_kl) / 3, direct.kl, rel_tol=1e-6)
    assert evaluate(other, windows, progress=False).window_kl == []


def test_the_reference_cache_keeps_hidden_states_and_gives_the_forwards_log_probs(tiny_loaded):
    """What the head reads (hidden size per position), not the vocabulary-wide log-probs, and
    put through the head again the log-probs are bit for bit the model's own."""
    from autocompress.evaluate import log_probs

    model, windows = tiny_loaded.model, _windows(tiny_loaded)
    cache = ReferenceCache(model, windows)
    for _ in range(2):
        for i in range(len(windows)):
            assert torch.equal(cache.get(i), log_probs(model, windows[i]))
    n, length = windows.shape
    assert cache.nbytes == n * length * model.config.hidden_size * 4


def test_a_model_whose_logits_are_not_its_heads_output_keeps_log_probs(tiny_loaded):
    import copy

    from autocompress.evaluate import log_probs

    model, windows = copy.deepcopy(tiny_loaded.model), _windows(tiny_loaded)
    forward = model.forward

    def scaled(*args, **kwargs):  # a logit scale after the head, as some architectures have
        out = forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    model.forward = scaled
    cache = ReferenceCache(model, windows)
    for i in range(len(windows)):
        assert torch.equal(cache.get(i), log_probs(model, windows[i]))
    n, length = windows.shape
    assert cache.nbytes == n * (length - 1) * model.config.vocab_size * 4


def test_a_reference_whose_head_changed_is_refused(tiny_loaded):
    import copy

    import pytest

    model, windows = copy.deepcopy(tiny_loaded.model), _windows(tiny_loaded)
    cache = ReferenceCache(model, windows)
    cache.get(0)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.5)
    with pytest.raises(RuntimeError, match="head changed"):
        cache.get(0)


def test_log_probs_in_place_are_the_kernels_own_and_kl_sums_every_row():
    """The log-softmax written over the logits is F.log_softmax bit for bit, and the KL summed
    KL_ROWS positions at a time covers every position (511: not a multiple of the rows)."""
    import torch.nn.functional as F

    from autocompress.evaluate import KL_ROWS, log_softmax_, window_sums

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(511, 3000, generator=g) * 4
    expected = F.log_softmax(logits, dim=-1)
    assert torch.equal(log_softmax_(logits.clone()), expected)
    ref = F.log_softmax(logits + torch.randn(511, 3000, generator=g), dim=-1)
    window = torch.randint(0, 3000, (512,), generator=g)
    nll, kl, tokens = window_sums(expected, window, ref)
    exact = (ref.double().exp() * (ref.double() - expected.double())).sum().item()
    assert 511 % KL_ROWS and tokens == 511
    assert math.isclose(kl, exact, rel_tol=1e-5)
    assert math.isclose(nll, -expected.double()[torch.arange(511), window[1:]].sum().item(),
                        rel_tol=1e-6)
