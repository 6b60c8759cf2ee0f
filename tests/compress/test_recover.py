"""Distillation recovery: only the format's free parameters move, held-out KL goes down, the
model is restored after, and a checkpoint resumes."""

import pytest
import torch

from autocompress.compress.apply import compressed_in_place
from autocompress.compress.codes_linear import CodesLinear
from autocompress.compress.recover import KDRecovery, KDSettings, apply_recovered
from autocompress.errors import AutocompressError
from autocompress.evaluate import ReferenceCache, evaluate
from autocompress.plan import LayerConfig


def _windows(loaded, n, length=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, loaded.model.config.vocab_size, (n, length), generator=g)


def _references(loaded):
    teacher = ReferenceCache(loaded.model, _windows(loaded, 6)).fill()
    holdout = ReferenceCache(loaded.model, _windows(loaded, 3, seed=1)).fill()
    return teacher, holdout


def _plan(loaded, bits=2):
    return {layer.name: LayerConfig(bits=bits, group_size=32) for layer in loaded.layers}


def _codes_state(model):
    return {n: (m.quantized.q.clone(), m.quantized.zero.clone(), m.quantized.scale.clone())
            for n, m in model.named_modules() if isinstance(m, CodesLinear)}


def test_kd_lowers_held_out_kl_moving_only_scales_and_norms(tiny_loaded):
    teacher, holdout = _references(tiny_loaded)
    original = {k: v.clone() for k, v in tiny_loaded.model.state_dict().items()}
    flags = [p.requires_grad for p in tiny_loaded.model.parameters()]
    settings = KDSettings(steps=30, lr=2e-2, eval_every=10, patience=3)
    with compressed_in_place(tiny_loaded, _plan(tiny_loaded), codes=True) as model:
        before = _codes_state(model)
        kl_built = evaluate(model, holdout.windows, holdout, progress=False).kl
        result = KDRecovery(settings, progress=False).run(model, teacher, holdout)
        after = _codes_state(model)
        assert result.kl_before == pytest.approx(kl_built, rel=1e-6)
        assert result.kl_after < 0.8 * kl_built  # measured as stored: float16 scales
        assert result.kl_after == pytest.approx(
            evaluate(model, holdout.windows, holdout, progress=False).kl, rel=1e-6)
        for name, (q, zero, scale) in before.items():
            q2, zero2, scale2 = after[name]
            assert torch.equal(q, q2) and torch.equal(zero, zero2), name  # codes, zeros: same
            assert scale2.shape == scale.shape and scale2.dtype == scale.dtype  # same bytes
            assert torch.equal(scale2, scale2.half().float())  # what float16 stores
        assert any(not torch.equal(s, after[n][2]) for n, (_, _, s) in before.items())
        norms = [k for k in result.tensors if k.endswith("norm.weight")]
        assert norms and set(result.tensors) == {f"{n}.scale" for n in before} | set(norms)
    restored = tiny_loaded.model.state_dict()
    assert [k for k in original if not torch.equal(restored[k], original[k])] == []
    assert [p.requires_grad for p in tiny_loaded.model.parameters()] == flags


def test_low_rank_factors_held_as_codes_compute_their_decoding_and_recover(tiny_loaded):
    """Low-rank layers whose factors are quantized are held as two CodesLinear: the same
    logits as their decoded factors, and recovery trains each factor's scales (codes and
    zeros kept), lowering the held-out KL."""
    from autocompress.compress.apply import LowRankLinear

    teacher, holdout = _references(tiny_loaded)
    low_rank = [layer.name for layer in tiny_loaded.layers]
    plan = {name: LayerConfig(bits=2, group_size=32, rank_ratio=0.5) for name in low_rank}
    x = holdout.windows[:1]
    with torch.no_grad(), compressed_in_place(tiny_loaded, plan) as model:
        decoded = model(x).logits
    with compressed_in_place(tiny_loaded, plan, codes=True) as model:
        for name in low_rank:
            module = model.get_submodule(name)
            assert isinstance(module, LowRankLinear)
            assert isinstance(module.up, CodesLinear) and isinstance(module.down, CodesLinear)
        with torch.no_grad():
            assert torch.equal(model(x).logits, decoded)
        before = _codes_state(model)
        settings = KDSettings(steps=20, lr=2e-2, eval_every=10, patience=3)
        result = KDRecovery(settings, progress=False).run(model, teacher, holdout)
        after = _codes_state(model)
    factors = {f"{name}.{part}" for name in low_rank for part in ("up", "down")}
    assert factors <= set(before)
    assert {f"{f}.scale" for f in factors} <= set(result.tensors)
    for name in factors:
        assert torch.equal(before[name][0], after[name][0])  # codes
        assert torch.equal(before[name][1], after[name][1])  # zeros
    assert sum(not torch.equal(before[f][2], after[f][2]) for f in factors) >= len(factors) - 1
    assert result.kl_after < 0.9 * result.kl_before


def test_recovered_tensors_rebuild_the_same_model_and_refuse_another_plan(tiny_loaded):
    teacher, holdout = _references(tiny_loaded)
    settings = KDSettings(steps=10, lr=2e-2, eval_every=5)
    with compressed_in_place(tiny_loaded, _plan(tiny_loaded), codes=True) as model:
        result = KDRecovery(settings, progress=False).run(model, teacher, holdout)
        logits = model(holdout.windows[:1]).logits
    with compressed_in_place(tiny_loaded, _plan(tiny_loaded), codes=True) as model:
        apply_recovered(model, result.tensors)
        assert torch.equal(model(holdout.windows[:1]).logits, logits)
    other = _plan(tiny_loaded)
    other[tiny_loaded.layers[0].name] = LayerConfig(bits=16)
    with compressed_in_place(tiny_loaded, other, codes=True) as model:
        with pytest.raises(AutocompressError, match="do not fit this plan"):
            apply_recovered(model, result.tensors)


class _Stop(Exception):
    pass


def _stop_after(monkeypatch, steps):
    """KDRecovery interrupted at its ``steps``+1-th training step, as a kill would stop it
    after the checkpoint of step ``steps``."""
    real, seen = KDRecovery._kl_loss, []

    def loss(model, teacher, index):
        if len(seen) == steps:
            raise _Stop
        seen.append(index)
        return real(model, teacher, index)
    monkeypatch.setattr(KDRecovery, "_kl_loss", staticmethod(loss))


def test_the_cosine_schedule_decays_to_zero():
    from autocompress.compress.recover import _lr_factor

    assert _lr_factor("cosine", 0, 100) == 1.0
    assert _lr_factor("cosine", 50, 100) == pytest.approx(0.5)
    assert _lr_factor("cosine", 99, 100) < 1e-3
    assert {_lr_factor("constant", s, 100) for s in (0, 50, 99)} == {1.0}


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_an_interrupted_recovery_resumes_from_its_checkpoint_to_the_same_result(
        tiny_loaded, tmp_path, monkeypatch, schedule):
    teacher, holdout = _references(tiny_loaded)
    full = KDSettings(steps=12, lr=2e-2, eval_every=4, checkpoint_every=4, patience=10,
                      schedule=schedule)
    with compressed_in_place(tiny_loaded, _plan(tiny_loaded), codes=True) as model:
        straight = KDRecovery(full, progress=False).run(model, teacher, holdout)
    assert straight.kl_after < straight.kl_before
    checkpoint = tmp_path / "kd.pt"
    # stopped after 8 of the 12 steps (a kill would leave this checkpoint), then resumed: the
    # learning rate of each step follows the 12-step schedule all the same
    with monkeypatch.context() as patch:
        _stop_after(patch, 8)
        with compressed_in_place(tiny_loaded, _plan(tiny_loaded), codes=True) as model:
            with pytest.raises(_Stop):
                KDRecovery(full, checkpoint, progress=False).run(model, teacher, holdout)
    with compressed_in_place(tiny_loaded, _plan(tiny_loaded), codes=True) as model:
        resumed = KDRecovery(full, checkpoint, progress=False).run(model, teacher, holdout)
    assert [s for s, _ in resumed.history] == [s for s, _ in straight.history] == [0, 4, 8, 12]
    assert [kl for _, kl in resumed.history] == pytest.approx([kl for _, kl in straight.history],
                                                              rel=1e-5)
    assert all(torch.allclose(resumed.tensors[k], straight.tensors[k]) for k in straight.tensors)
    checkpoint.write_bytes(b"not a checkpoint")
    with compressed_in_place(tiny_loaded, _plan(tiny_loaded), codes=True) as model:
        with pytest.raises(AutocompressError, match="cannot be resumed"):
            KDRecovery(full, checkpoint, progress=False).run(model, teacher, holdout)


def test_a_rate_that_makes_the_first_validation_worse_starts_over_at_a_quarter(
        tiny_loaded, tmp_path, monkeypatch):
    """0.2 undoes the tiny plan within 4 steps (best step 0 without back-off); backed off,
    the run is exactly a run started at 0.05: the plan's own tensors, a fresh optimizer, the
    same windows. Killed after the back-off, it resumes at 0.05."""
    teacher, holdout = _references(tiny_loaded)

    def settings(lr, backoffs=2):
        return KDSettings(steps=12, lr=lr, eval_every=4, checkpoint_every=4, patience=10,
                          lr_backoffs=backoffs)

    def run(s, checkpoint=None):
        with compressed_in_place(tiny_loaded, _plan(tiny_loaded), codes=True) as model:
            return KDRecovery(s, checkpoint, progress=False).run(model, teacher, holdout)

    stuck = run(settings(0.2, backoffs=0))
    assert stuck.best_step == 0 and stuck.lr_abandoned == []
    assert stuck.history[1][1] > stuck.history[0][1]
    backed_off = run(settings(0.2))
    direct = run(settings(0.05))
    assert direct.lr_abandoned == [] and direct.best_step == 12
    assert backed_off.lr_abandoned == [0.2] and backed_off.lr == pytest.approx(0.05)
    assert backed_off.best_step == 12 and backed_off.kl_after < 0.9 * backed_off.kl_before
    assert [s for s, _ in backed_off.history] == [0, 4, 8, 12]
    assert [kl for _, kl in backed_off.history] == pytest.approx(
        [kl for _, kl in direct.history], rel=1e-5)
    assert all(torch.allclose(backed_off.tensors[k], direct.tensors[k]) for k in direct.tensors)
    checkpoint = tmp_path / "kd.pt"
    with monkeypatch.context() as patch:
        _stop_after(patch, 4 + 6)  # the abandoned 4 steps, then 6 at the quarter rate
        with pytest.raises(_Stop):
            run(settings(0.2), checkpoint)
    resumed = run(settings(0.2), checkpoint)
    assert resumed.lr_abandoned == [0.2] and resumed.lr == pytest.approx(0.05)
    assert all(torch.allclose(resumed.tensors[k], direct.tensors[k]) for k in direct.tensors)


def test_a_recovery_record_keeps_the_rates_it_abandoned():
    from autocompress.recovery import RecoveryRecord

    record = RecoveryRecord(method="kd", sha256="0" * 64, steps=400, best_step=380, lr=5e-4,
                            seed=0, train_windows=64, val_windows=8, kl_before=0.116,
                            kl_after=0.087, lr_abandoned=[2e-3])
    assert RecoveryRecord.from_dict(record.to_dict()) == record
    assert "at 0.0005 after 0.002 made it worse" in record.describe()
    old = {k: v for k, v in record.to_dict().items() if k != "lr_abandoned"}
    assert RecoveryRecord.from_dict(old).lr_abandoned == []  # plans from before back-off
    lowered = RecoveryRecord.from_dict({**record.to_dict(), "lr_lowered_at": [140]})
    assert lowered.lr_lowered_at == [140] and "quartered at step 140" in lowered.describe()
    assert RecoveryRecord.from_dict(lowered.to_dict()) == lowered


def _scripted_validation(patch, kls):
    """The held-out KL the run sees at each validation, in order (the final measurement of
    the best state is evaluate's own)."""
    from autocompress.compress.recover import KDRecovery as _KD

    seen = iter(kls)
    patch.setattr(_KD, "_held_out_kl", staticmethod(lambda model, holdout: next(seen)))


def test_a_stalled_run_goes_on_from_its_best_state_at_a_quarter_of_the_rate(
        tiny_loaded, tmp_path, monkeypatch):
    """Validation improves at step 4, then stalls (patience 2: steps 8 and 12). Without
    plateau back-offs the run stops at 12; with one it goes back to step 4's tensors (checked
    as they are put back) and trains on at a quarter of the rate, here to a new best at 16;
    a second stall then stops it. Killed after the lowering, it resumes at the lowered rate."""
    from autocompress.compress.recover import _Trainer

    teacher, holdout = _references(tiny_loaded)
    kls = [1.0, 0.8, 0.9, 0.85, 0.7, 0.75, 0.72]  # steps 0, 4, 8, 12, 16, 20, 24

    def run(backoffs, checkpoint=None):
        s = KDSettings(steps=40, lr=0.02, eval_every=4, checkpoint_every=4, patience=2,
                       lr_backoffs=0, plateau_backoffs=backoffs)
        with compressed_in_place(tiny_loaded, _plan(tiny_loaded), codes=True) as model:
            return KDRecovery(s, checkpoint, progress=False).run(model, teacher, holdout)

    with monkeypatch.context() as patch:
        _scripted_validation(patch, kls)
        stopped = run(0)
    assert stopped.steps_run == 12 and stopped.best_step == 4 and stopped.lr_lowered_at == []
    restored = []
    original = _Trainer.load_state

    def spy(trainer, state):
        original(trainer, state)
        restored.append((trainer.state(), state))

    with monkeypatch.context() as patch:
        _scripted_validation(patch, kls)
        patch.setattr(_Trainer, "load_state", spy)
        lowered = run(1)
    assert lowered.lr_lowered_at == [12] and lowered.lr == pytest.approx(0.005)
    assert lowered.best_step == 16 and lowered.steps_run == 24
    assert [s for s, _ in lowered.history] == [0, 4, 8, 12, 16, 20, 24]
    (now, best), = restored
    assert set(now) == set(best) and all(torch.allclose(now[k], best[k]) for k in best)
    # what was put back is step 4's state (the stopped run's result), not step 12's
    assert all(torch.allclose(best[k], stopped.tensors[k]) for k in best)
    checkpoint = tmp_path / "kd.pt"
    with monkeypatch.context() as patch:
        _scripted_validation(patch, kls)
        _stop_after(patch, 14)  # two steps past the lowering
        with pytest.raises(_Stop):
            run(1, checkpoint)
    with monkeypatch.context() as patch:
        _scripted_validation(patch, kls[4:])  # the resume validates from step 16 on
        resumed = run(1, checkpoint)
    assert resumed.lr_lowered_at == [12] and resumed.lr == pytest.approx(0.005)
    assert resumed.best_step == 16 and resumed.steps_run == 24


def test_the_trainer_puts_back_a_state_it_gave(tiny_loaded):
    from autocompress.compress.recover import _Trainer

    with compressed_in_place(tiny_loaded, _plan(tiny_loaded), codes=True) as model:
        trainer = _Trainer(model)
        with trainer, torch.no_grad():
            for i, theta in enumerate(trainer.theta.values()):
                theta.add_(0.01 * (i + 1))
            for w in trainer.norm_weights.values():
                w.mul_(1.5)
            saved = trainer.state()
            trainer.restart()
            assert not all(torch.allclose(trainer.state()[k], saved[k]) for k in saved)
            trainer.load_state(saved)
            again = trainer.state()
    assert all(torch.equal(again[k], saved[k]) for k in saved)


def test_a_plan_without_codes_has_nothing_to_recover(tiny_loaded):
    teacher, holdout = _references(tiny_loaded)
    with compressed_in_place(tiny_loaded, _plan(tiny_loaded, bits=16), codes=True) as model:
        with pytest.raises(AutocompressError, match="nothing to recover"):
            KDRecovery(KDSettings(steps=2), progress=False).run(model, teacher, holdout)


@pytest.mark.parametrize("bad", [{"steps": 0}, {"lr": 0.0}, {"lr": 3}, {"patience": True},
                                 {"lr_backoffs": -1}, {"plateau_backoffs": -1},
                                 {"plateau_backoffs": 1.5}])
def test_kd_settings_refuse_nonsense(bad):
    with pytest.raises(AutocompressError):
        KDSettings(**bad)


# -- apply --recover kd: the plan names its tensors, and every build of it uses them -----------

def _recovered_apply(tiny_model_dir, tmp_path, bits="2", extra=(), plan_extra=()):
    from autocompress.cli import main

    plan = tmp_path / "plan.json"
    assert main(["plan", "--model", str(tiny_model_dir), "--bits", bits, "--group-size", "32",
                 "--calib-windows", "4", "--window-len", "64", *plan_extra,
                 "--out", str(plan)]) == 0
    out = tmp_path / "recovered"
    assert main(["apply", str(plan), "--out", str(out), "--recover", "kd", "--kd-steps", "6",
                 "--kd-lr", "0.02", "--kd-val-windows", "2", *extra]) == 0
    return plan, out


def test_apply_recover_writes_a_plan_whose_every_build_has_the_recovered_scales(
        tiny_model_dir, tmp_path, capsys):
    import json

    from transformers import AutoModelForCausalLM

    from autocompress.cli import main
    from autocompress.plan import Plan

    plan, out = _recovered_apply(tiny_model_dir, tmp_path)
    recovered = Plan.load(out / "plan.json")
    assert recovered.recovery.method == "kd" and recovered.recovery.steps == 6
    assert recovered.recovery.kl_after < recovered.recovery.kl_before
    assert (out / "recovered.safetensors").is_file()
    assert not list(tmp_path.glob("*.kd-checkpoint.pt"))  # removed once written

    windows = ["--windows", "2", "--window-len", "64", "--json"]
    capsys.readouterr()
    assert main(["eval", str(out / "plan.json"), *windows]) == 0
    after = json.loads(capsys.readouterr().out)
    assert main(["eval", str(plan), *windows]) == 0
    before = json.loads(capsys.readouterr().out)
    assert after["weight_bytes"] == before["weight_bytes"]  # same format, same bytes
    assert after["kl"] != before["kl"]

    # the written float16 model is the eval's build (the same weights, in float16)
    from autocompress.compress.reproduce import built_in_place
    from autocompress.model import load_model

    loaded = load_model(str(tiny_model_dir))
    written = AutoModelForCausalLM.from_pretrained(out)
    with built_in_place(loaded, recovered, progress=False) as model:
        for layer in loaded.layers[:3]:
            assert torch.allclose(written.get_submodule(layer.name).weight.float(),
                                  model.get_submodule(layer.name).weight, atol=1e-3), layer.name
        norm = written.model.layers[0].input_layernorm.weight.float()
        assert torch.allclose(norm, model.model.layers[0].input_layernorm.weight, atol=1e-3)
    assert not torch.equal(norm, loaded.model.model.layers[0].input_layernorm.weight.half().float())


@pytest.mark.parametrize("plan_extra", [(), ("--rank-ratio", "0.5")],
                         ids=["dense", "low-rank"])
def test_a_recovered_plan_packs_to_the_same_bytes_and_computes_its_build(
        tiny_model_dir, tmp_path, capsys, plan_extra):
    from autocompress.compress.reproduce import built_in_place
    from autocompress.model import load_model
    from autocompress.plan import Plan
    from autocompress.runtime.convert import load_packed

    from autocompress.cli import main

    plan, out = _recovered_apply(tiny_model_dir, tmp_path, bits="3", extra=["--packed"],
                                 plan_extra=plan_extra)
    if plan_extra:  # every layer low rank: the recovered scales are its factors'
        from safetensors.torch import load_file

        names = load_file(out / "recovered.safetensors")
        assert any(k.endswith(".up.scale") for k in names)
        assert any(k.endswith(".down.scale") for k in names)
    assert main(["apply", str(plan), "--packed", "--out", str(tmp_path / "plain")]) == 0
    err = capsys.readouterr().err
    sizes = [line for line in err.splitlines() if "plan accounting" in line]
    packed, plain = load_packed(out), load_packed(tmp_path / "plain")
    nbytes = lambda m: sum(p.numel() * p.element_size() for p in m.state_dict().values())  # noqa
    assert nbytes(packed.model) == nbytes(plain.model)
    assert (out / "recovered.safetensors").is_file()
    loaded = load_model(str(tiny_model_dir))
    x = torch.randint(0, 300, (1, 12))
    with torch.no_grad(), built_in_place(loaded, Plan.load(out / "plan.json"),
                                         progress=False) as model:
        assert torch.allclose(packed.model(x).logits, model(x).logits, atol=2e-2, rtol=1e-2)
        assert not torch.allclose(plain.model(x).logits, model(x).logits, atol=2e-3)
    del sizes


def test_a_recovered_plan_with_its_tensors_missing_or_altered_is_one_line(
        tiny_model_dir, tmp_path, capsys):
    from autocompress.cli import main

    _, out = _recovered_apply(tiny_model_dir, tmp_path)
    tensors = out / "recovered.safetensors"
    data = tensors.read_bytes()
    tensors.write_bytes(data[:-8] + b"\0" * 8)
    capsys.readouterr()
    assert main(["eval", str(out / "plan.json"), "--windows", "1", "--window-len", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "SHA-256 differs" in err and len(err.splitlines()) == 1
    tensors.unlink()
    assert main(["eval", str(out / "plan.json"), "--windows", "1", "--window-len", "32"]) == 2
    assert "are missing" in capsys.readouterr().err


# -- which windows recovery trains on --------------------------------------------------------

def test_recovery_trains_on_the_texts_first_windows_clear_of_the_held_out_end(tiny_loaded):
    from autocompress.compress.recover import recovery_windows
    from autocompress.data import load_stream
    from autocompress.provenance import Provenance

    provenance = Provenance(calib_text=None, calib_windows=4, window_len=64)
    stream = load_stream(tiny_loaded.tokenizer, None, "calib")
    every = stream.windows(stream.max_windows(64), 64)
    train, val = recovery_windows(tiny_loaded.tokenizer, provenance, 10, 3)
    assert torch.equal(train, every[:10]) and torch.equal(val, every[10:13])
    # the windows at the end that the plan's held-out figures came from are never trained on
    room = every.shape[0] - 8
    train, val = recovery_windows(tiny_loaded.tokenizer, provenance, room - 3, 3,
                                  reserved_at_end=8)
    assert torch.equal(val[-1], every[room - 1])
    with pytest.raises(AutocompressError, match="before the 8 held out at its end"):
        recovery_windows(tiny_loaded.tokenizer, provenance, room - 2, 3, reserved_at_end=8)


def test_kd_train_windows_is_recorded_and_refused_past_the_text(tiny_model_dir, tmp_path, capsys):
    from autocompress.cli import main
    from autocompress.plan import Plan

    _, out = _recovered_apply(tiny_model_dir, tmp_path, extra=["--kd-train-windows", "9"])
    recovered = Plan.load(out / "plan.json")
    assert recovered.recovery.train_windows == 9 and recovered.recovery.val_windows == 2
    capsys.readouterr()
    assert main(["apply", str(tmp_path / "plan.json"), "--out", str(tmp_path / "again"),
                 "--recover", "kd", "--kd-train-windows", "100000"]) == 2
    said = capsys.readouterr()
    assert "fewer --kd-train-windows" in said.out + said.err
    assert not (tmp_path / "again").exists()
