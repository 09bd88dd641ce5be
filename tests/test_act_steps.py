"""Activation steps learned during the rounding: LSQ's gradient on both kernels, steps that move toward a better
fit, the keep-best check's fallback to calibration's steps, resume."""

import pytest
import torch

import fxq
from fxq.config import LFHConfig, Method, PTQConfig, RoundingConfig
from fxq.eptq import train as rounding_train
from fxq.eptq.act_steps import ActSteps
from fxq.quant.modules import ActQuant
from fxq.quant.qmath import QSpec
from fxq.targets import INT8
from tests.conftest import seeded
from tests.test_rounding import _interrupted_and_resumed

CALIB = [seeded(8, 3, 16, 16, seed=i) for i in range(4)]


def _eptq(model, act_bits=4, **rounding):
    cfg = PTQConfig(
        target=INT8.with_bits(4, act_bits),
        method=Method.EPTQ,
        rounding=RoundingConfig(**{"iterations": 60, "batch_size": 8, "keep_best": False, **rounding}),
        lfh=LFHConfig(min_probes=2, max_probes=4, images=8, batch_size=8),
        progress=False,
    )
    return fxq.quantize(model, CALIB, cfg)


def _acts(gm) -> dict[str, ActQuant]:
    return {n: m for n, m in gm.named_modules() if isinstance(m, ActQuant)}


@pytest.mark.parametrize("fused", [True, False], ids=["training kernel", "formula"])
@pytest.mark.parametrize("signed", [True, False])
def test_the_step_gradient_is_lsqs(fused, signed):
    """d out / d s = round(x/s) - x/s inside the grid and the grid's bound outside it; x gets the straight-through
    gradient; a log factor u (s = s0 e^u) gets s times it."""
    spec = QSpec(bits=4, signed=signed)
    q = ActQuant(spec, threshold=1.0)
    q.training_kernels = fused
    x = (seeded(2, 3, 5, 5, seed=3) * 0.8).requires_grad_()
    steps = ActSteps([q])
    with torch.no_grad():
        steps.log_factor.fill_(0.1)
    steps.refresh()
    g = seeded(2, 3, 5, 5, seed=4)
    (q(x) * g).sum().backward()
    s = float(q.scale) * torch.exp(torch.tensor(0.1)).item()
    codes = x.detach() / s
    inside = (codes.round() >= spec.qmin) & (codes.round() <= spec.qmax)
    dout_ds = torch.where(inside, codes.round() - codes, codes.round().clamp(spec.qmin, spec.qmax))
    torch.testing.assert_close(steps.log_factor.grad, (g * dout_ds).sum().reshape(1) * s, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, g * inside, rtol=1e-6, atol=0)  # (1/s) * s: 1 within a rounding


def _widened(monkeypatch, factor: float) -> None:
    """Every activation step `factor` times calibration's when the rounding starts (a badly fitted start)."""
    run = rounding_train.RoundingOptimizer.run

    def widened_run(self, gm):
        with torch.no_grad():
            for m in _acts(gm).values():
                m.scale.mul_(factor)
        return run(self, gm)

    monkeypatch.setattr(rounding_train.RoundingOptimizer, "run", widened_run)


def test_steps_started_too_wide_shrink_and_the_loss_falls_below_fixed_steps(tiny_net, monkeypatch):
    """From steps three times calibration's (the weights' rounding held, lr 0), the trained steps shrink and the
    run ends at a lower loss than the same run with the steps fixed; the quantized model holds the start's steps
    times the learned factors, with no live step left behind."""
    _widened(monkeypatch, 3.0)
    base, _ = fxq.quantize(tiny_net, CALIB, PTQConfig(target=INT8.with_bits(4, 4), progress=False))
    _, fixed = _eptq(tiny_net, iterations=100, lr_rounding=0.0)
    qgm, report = _eptq(tiny_net, iterations=100, lr_rounding=0.0, train_act_steps=True, lr_act_steps=2e-2)
    r = report.rounding
    assert r["act_steps_trained"] == len(_acts(qgm)) and r["act_steps_moved_1pct"] > 0
    factors = torch.tensor([float(a.scale / (3 * b.scale)) for a, b in zip(_acts(qgm).values(), _acts(base).values())])
    assert float(factors.min()) == pytest.approx(r["act_step_factor_min"], rel=1e-5)
    assert float(factors.max()) == pytest.approx(r["act_step_factor_max"], rel=1e-5)
    assert float(factors.median()) < 0.8  # most steps shrank back toward a fit
    assert all(m.live_scale is None for m in qgm.modules() if isinstance(m, ActQuant))
    last = sum(loss for _, loss in r["history"][-10:])
    last_fixed = sum(loss for _, loss in fixed.rounding["history"][-10:])
    assert last < 0.9 * last_fixed, (last, last_fixed)


def test_keep_best_falling_back_restores_calibrations_steps(tiny_net, monkeypatch):
    """Learned steps made bad on purpose (eight times what training reached): the result distils worse than RTN,
    so the check keeps RTN with calibration's activation steps, bit for bit."""
    rtn, _ = fxq.quantize(tiny_net, CALIB, PTQConfig(target=INT8.with_bits(4, 4), progress=False))
    monkeypatch.setattr(ActSteps, "steps", lambda self: 8 * self.start * self.log_factor.detach().exp())
    qgm, report = _eptq(tiny_net, iterations=20, train_act_steps=True, keep_best=True)
    assert report.rounding["kept"] == "rtn"
    for (name, a), b in zip(_acts(rtn).items(), _acts(qgm).values()):
        assert torch.equal(a.scale, b.scale), name
    x = seeded(4, 3, 16, 16, seed=11)
    torch.testing.assert_close(qgm(x), rtn(x), rtol=0, atol=0)


def test_resume_with_learned_steps_gives_the_same_model(tiny_net, tmp_path, monkeypatch):
    settings = {"iterations": 24, "checkpoint_every": 8, "train_act_steps": True, "lr_act_steps": 2e-2}
    saved, report = _interrupted_and_resumed(tiny_net, tmp_path, monkeypatch, 13, **settings)
    assert saved["step"] == 8 and saved["acts"]["log_factor"].abs().max() > 0
    assert report.rounding["resumed_at"] == 8 and report.rounding["act_steps_moved_1pct"] > 0


def test_a_graph_without_activation_quantizers_trains_no_steps():
    """Every activation kept float: nothing to train, and every call is a no-op rather than an error."""
    steps = ActSteps([])
    steps.refresh()
    steps.harden_()
    steps.use_start_()
    steps.load_state_dict(steps.state_dict())
    assert steps.log_factor.numel() == 0
    assert steps.summary() == {"act_steps_trained": 0}
