"""A time budget for the whole run: the rounding's iteration count is planned from its measured steps, shortened
when it runs late, zero when the budget is spent before it starts; the LFH stops at its minimum probe count after
its share; a budget that fits changes nothing. The clock is a fake one, advanced by the rounding's steps."""

import dataclasses
import types

import pytest
import torch

import fxq
from fxq.config import LFHConfig, Method, PTQConfig, RoundingConfig
from fxq.eptq import train as rounding_train
from fxq.eptq.budget import LFH_SHARE, PLAN_AFTER, REPLAN_SHARE, parse_duration, planned_iterations
from fxq.errors import ConfigError
from fxq.ir import meta
from fxq.quant.modules import QuantWeight
from tests.conftest import conv_stack, room_for, seeded

CALIB = [seeded(8, 3, 16, 16, seed=i) for i in range(4)]


def _cfg(budget: float | None, **rounding) -> PTQConfig:
    return PTQConfig(
        target=fxq.INT8.with_bits(3),
        method=Method.EPTQ,
        rounding=RoundingConfig(**{"iterations": 1000, "batch_size": 8, "keep_best": False, **rounding}),
        lfh=LFHConfig(min_probes=2, max_probes=4, images=8, batch_size=8),
        time_budget=budget,
        progress=False,
    )


@pytest.fixture
def step_clock(monkeypatch):
    """A clock for the run's deadline that moves only when the rounding takes a step: `cost(step)` seconds."""
    clock = types.SimpleNamespace(now=0.0, cost=lambda step: 1.0)
    monkeypatch.setattr(meta, "time", types.SimpleNamespace(monotonic=lambda: clock.now))
    real = rounding_train.batch_indices

    def stepping(n, batch, step, seed):
        clock.now += clock.cost(step)
        return real(n, batch, step, seed)

    monkeypatch.setattr(rounding_train, "batch_indices", stepping)
    return clock


def _weights(gm) -> list[torch.Tensor]:
    return [m.quantized_weight().detach().clone() for m in gm.modules() if isinstance(m, QuantWeight)]


def test_durations_read_as_seconds():
    assert [parse_duration(t) for t in ("900", "900s", "15m", "1.5h", "1h30m", " 2 min ")] == [
        900,
        900,
        900,
        5400,
        5400,
        120,
    ]
    for bad in ("", "15 parsecs", "m", "0s", "-5m", "15m junk"):
        with pytest.raises(ConfigError, match="duration|> 0"):
            parse_duration(bad)
    with pytest.raises(ConfigError, match="time_budget"):
        PTQConfig(time_budget=0)


def test_the_plan_fills_what_is_left_and_never_exceeds_the_limit():
    assert planned_iterations(4, 1000, seconds_left=26.0, seconds_per_step=1.0, reserve=1.0) == 29
    assert planned_iterations(4, 20, seconds_left=26.0, seconds_per_step=1.0, reserve=1.0) == 20
    assert planned_iterations(4, 1000, seconds_left=0.5, seconds_per_step=1.0, reserve=1.0) == 4  # no more steps


def test_the_rounding_plans_its_length_from_its_steps(tiny_net, step_clock):
    _, report = fxq.quantize(tiny_net, CALIB, _cfg(30.0))
    r = report.rounding
    # each step costs 1 s on the run's clock; after PLAN_AFTER steps 26 s are left, 2 steps' time is kept for the
    # end (no keep-best check here)
    assert PLAN_AFTER == 4 and (r["iterations"], r["iterations_limit"]) == (28, 1000)
    assert r["seconds_left_in_budget"] == pytest.approx(2.0) and r["time_budget_s"] == 30.0


def test_a_run_that_slows_down_stops_early_on_the_grid(tiny_net, step_clock):
    step_clock.cost = lambda step: 1.0 if step < PLAN_AFTER else 3.0
    qgm, report = fxq.quantize(tiny_net, CALIB, _cfg(30.0))
    assert PLAN_AFTER < report.rounding["iterations"] < 28
    assert report.rounding["seconds_left_in_budget"] >= 0
    for m in qgm.modules():
        if isinstance(m, QuantWeight):
            w = m.layer.weight.detach()
            assert torch.equal((w / m.scale_like(w)).round() * m.scale_like(w), w)


@pytest.mark.parametrize(
    "slow",
    [range(PLAN_AFTER), range(16, 32), range(100, 140)],
    ids=["the timed steps", "a window early on", "a window after the warm-up"],
)
def test_a_run_whose_steps_are_slow_for_a_while_plans_again_from_its_pace(tiny_net, step_clock, slow):
    """Steps cost 3 s for a while, then 1 s again: planned on a slow window the run would end with a large part of its
    budget unused (the timed steps: near step 127; steps 16 to 31, which a plan on each doubled window inside the
    first tenth of the length ended on: near step 145). Planned again after each window to the end, it takes the
    steps the budget holds and still ends inside it."""
    step_clock.cost = lambda step: 3.0 if step in slow else 1.0
    _, report = fxq.quantize(tiny_net, CALIB, _cfg(400.0))
    r = report.rounding
    extra = 2 * len(slow)  # the slow steps' extra seconds
    assert 400 - extra - 30 < r["iterations"] and 0 <= r["seconds_left_in_budget"] <= 3.0
    assert REPLAN_SHARE * 400 < 32  # windows shorter than the slow stretches


def test_the_budget_keeps_the_time_the_check_takes(tiny_net, step_clock, monkeypatch):
    """Each batch of the keep-best check costs as much as a step (as past a large frozen prefix, where a step is
    cheap beside a forward of the whole graph): the run times a check batch before its steps and ends inside the
    budget. Modelled as a third of a step, the check's 8 batches ran 3 s past it."""
    losses = rounding_train.RoundingOptimizer._losses

    def counted(self, *args):
        if not torch.is_grad_enabled():  # the check's batches, and the two that time one
            step_clock.now += 1.0
        return losses(self, *args)

    monkeypatch.setattr(rounding_train.RoundingOptimizer, "_losses", counted)
    _, report = fxq.quantize(tiny_net, CALIB, _cfg(40.0, keep_best=True))
    r = report.rounding
    assert r["kept"] in ("eptq", "rtn") and r["iterations"] > PLAN_AFTER
    # 2 s timing a check batch, then the check's 8 batches of 1 s inside the reserve; left over: its 2 steps and
    # the quarter more it keeps for the check (CHECK_MARGIN)
    assert r["seconds_left_in_budget"] == pytest.approx(2.0 + 8 * (rounding_train.CHECK_MARGIN - 1))


def test_groups_of_layers_share_the_budget(step_clock, monkeypatch):
    """Three groups (the state does not fit at once): each plans its steps inside an equal share of the time left
    when it starts, and the run ends inside the budget."""
    model = conv_stack()
    monkeypatch.setattr(rounding_train, "available_bytes", lambda device: room_for(model, 0.95))
    _, report = fxq.quantize(model, CALIB, _cfg(30.0))
    r = report.rounding
    # shares of 10, 11 and 13 s: PLAN_AFTER steps, then those that leave each group 2 steps' reserve: 8 + 9 + 11
    assert len(r["groups"]) == 3 and r["iterations"] == 28
    assert r["seconds_left_in_budget"] == pytest.approx(2.0)


def test_a_budget_spent_before_the_rounding_leaves_rtn(tiny_net):
    rtn, _ = fxq.quantize(tiny_net, CALIB, PTQConfig(target=fxq.INT8.with_bits(3), progress=False))
    qgm, report = fxq.quantize(tiny_net, CALIB, _cfg(1e-6))
    assert report.rounding["iterations"] == 0
    for a, b in zip(_weights(rtn), _weights(qgm)):
        assert torch.equal(a, b)


def test_a_budget_that_fits_changes_nothing(tiny_net):
    plain, _ = fxq.quantize(tiny_net, CALIB, _cfg(None, iterations=12))
    budgeted, report = fxq.quantize(tiny_net, CALIB, _cfg(1e6, iterations=12))
    assert report.rounding["iterations"] == 12
    for a, b in zip(_weights(plain), _weights(budgeted)):
        assert torch.equal(a, b)


def test_a_resumed_budgeted_run_keeps_its_planned_length(tiny_net, step_clock, tmp_path, monkeypatch):
    settings = {"checkpoint_every": 8}
    straight, _ = fxq.quantize(tiny_net, CALIB, _cfg(30.0, checkpoint_dir=str(tmp_path / "a"), **settings))

    def interrupt_at_step_13(step):
        if step == 13:
            raise KeyboardInterrupt
        return 1.0

    step_clock.now, step_clock.cost = 0.0, interrupt_at_step_13
    with pytest.raises(KeyboardInterrupt):
        fxq.quantize(tiny_net, CALIB, _cfg(30.0, checkpoint_dir=str(tmp_path / "b"), **settings))
    assert torch.load(tmp_path / "b" / "rounding.pt", weights_only=True)["planned"] == 28
    step_clock.now, step_clock.cost = 0.0, lambda step: 1.0
    resumed, report = fxq.quantize(
        tiny_net, CALIB, _cfg(30.0, checkpoint_dir=str(tmp_path / "b"), resume=True, **settings)
    )
    assert (report.rounding["resumed_at"], report.rounding["iterations"]) == (8, 28)
    for a, b in zip(_weights(straight), _weights(resumed)):
        assert torch.equal(a, b)


def test_the_lfh_stops_at_its_minimum_once_its_share_is_spent(tiny_net, monkeypatch):
    lfh = LFHConfig(min_probes=2, max_probes=40, rel_tol=1e-12, images=16, batch_size=8)
    # one step: a run without whole-network steps reads no LFH
    cfg = PTQConfig(method=Method.EPTQ, lfh=lfh, rounding=RoundingConfig(iterations=1, batch_size=4), progress=False)
    _, free = fxq.quantize(tiny_net, CALIB, cfg)
    assert free.lfh_probes == [40, 40]  # a tolerance no trace meets: every batch takes the most probes
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(meta, "time", types.SimpleNamespace(monotonic=lambda: clock.now))
    monkeypatch.setattr(
        "fxq.eptq.lfh.LFHReducer.finish", _advancing(clock, 100.0 * LFH_SHARE / 5)
    )  # the share is spent after 5 probes
    _, budgeted = fxq.quantize(tiny_net, CALIB, dataclasses.replace(cfg, time_budget=100.0))
    assert budgeted.lfh_probes == [5, 2]


def _advancing(clock, seconds: float):
    from fxq.kernels.lfh import LFHReducer

    real = LFHReducer.finish

    def finish(self, *args, **kwargs):
        clock.now += seconds
        return real(self, *args, **kwargs)

    return finish
