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
