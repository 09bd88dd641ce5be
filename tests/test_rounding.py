"""EPTQ rounding: soft quantizer init, hard rounding on the grid, lr = 0 is RTN, the loss falls, resume."""

import pytest
import torch
from fxq.passes import rounding as rounding_pass
from fxq.passes.rounding import batch_indices, beta_at
from torch import nn

import fxq
from fxq.config import LFHConfig, LossWeights, Method, PTQConfig, RoundingConfig
from fxq.errors import ConfigError
from fxq.modules import QuantWeight, layer_forward, mean_output_shift
from fxq.qmath import QSpec, weight_thresholds
from fxq.targets import INT8
from tests.conftest import seeded

CALIB = [seeded(8, 3, 16, 16, seed=i) for i in range(4)]


def _eptq(model, bits=3, **rounding):
    cfg = PTQConfig(
        target=INT8.with_bits(bits),
        method=Method.EPTQ,
        rounding=RoundingConfig(**{"iterations": 60, "batch_size": 8, "keep_best": False, **rounding}),
        lfh=LFHConfig(min_probes=2, max_probes=4, images=8, batch_size=8),
        progress=False,
    )
    return fxq.quantize(model, CALIB, cfg)


def _losses(report) -> list[float]:
    return [loss for _, loss in report.rounding["history"]]


def _quant_layers(gm):
    return {n: m for n, m in gm.named_modules() if isinstance(m, QuantWeight)}


def test_soft_weight_at_init_equals_the_float_weight_inside_the_grid():
    layer = nn.Conv2d(4, 6, 3)
    spec = QSpec(4, signed=True, per_channel=True)
    qw = QuantWeight(layer, spec, weight_thresholds(layer.weight.detach(), spec))
    qw.start_soft_rounding_()
    w = layer.weight.detach()
    inside = (w / qw.scale_like(w)).abs() < spec.qmax - 0.01  # clipped weights cannot equal their float value
    assert inside.float().mean() > 0.5
    torch.testing.assert_close(qw.quantized_weight()[inside], w[inside], rtol=0, atol=1e-5)


def _assert_on_grid(qgm) -> None:
    layers = _quant_layers(qgm)
    assert len(layers) == 4
    for qw in layers.values():
        w = qw.layer.weight.detach()
        codes = (w / qw.scale_like(w)).round()
        assert torch.equal(codes * qw.scale_like(w), w), "weights off the grid"
        assert codes.min() >= qw.spec.qmin and codes.max() <= qw.spec.qmax
        assert qw.rounding is None and qw.w_floor is None and qw.w_free is None and qw.shift_map is None
        torch.testing.assert_close(qw.quantized_weight(), w, rtol=0, atol=0)  # RTN of the result is itself


@pytest.mark.slow
def test_compiled_student_and_teacher_train_the_same_run(tiny_net):
    """compile=True (torch.compile of both graphs, meant for the GPU) on the CPU: the losses of the eager run."""
    qgm, compiled = _eptq(tiny_net, iterations=8, compile=True)
    _, eager = _eptq(tiny_net, iterations=8)
    a, b = _losses(compiled), _losses(eager)
    assert len(a) == 8 and a == pytest.approx(b, rel=1e-3)
    _assert_on_grid(qgm)


def test_hardened_weights_lie_on_their_integer_grid(tiny_net):
    qgm, report = _eptq(tiny_net, iterations=20)
    _assert_on_grid(qgm)
    assert report.rounding["iterations"] == 20 and len(report.rounding["history"]) > 0


def test_bf16_autocast_the_gpu_default_runs_on_the_cpu_and_tracks_fp32(tiny_net):
    """amp=True forces the autocast path CUDA takes by default: the same run up to bf16 rounding."""
    qgm, amp = _eptq(tiny_net, iterations=20, amp=True)
    _, fp32 = _eptq(tiny_net, iterations=20, amp=False)
    a, b = _losses(amp), _losses(fp32)
    assert a != b, "amp=True did not autocast on the CPU"  # identical runs otherwise: the same seed and batches
    assert a == pytest.approx(b, rel=0.1)
    _assert_on_grid(qgm)
    assert not torch.is_autocast_enabled("cpu")  # left as it was


def test_zero_learning_rates_reproduce_rtn_exactly(tiny_net):
    rtn, _ = fxq.quantize(tiny_net, CALIB, PTQConfig(target=INT8.with_bits(3), progress=False))
    eptq, _ = _eptq(tiny_net, iterations=10, lr_rounding=0.0, lr_bias=0.0)
    for (name, a), b in zip(_quant_layers(rtn).items(), _quant_layers(eptq).values()):
        assert torch.equal(a.quantized_weight(), b.quantized_weight()), name
        assert torch.equal(a.layer.bias, b.layer.bias), name
    x = seeded(4, 3, 16, 16, seed=11)
    torch.testing.assert_close(eptq(x), rtn(x), rtol=0, atol=0)


def test_the_distillation_loss_falls(tiny_net):
    _, report = _eptq(tiny_net, bits=2, iterations=150, warmup=0.9, lr_rounding=5e-2)
    losses = _losses(report)
    assert len(losses) >= 20
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)


def test_keep_best_never_ends_worse_than_rtn_on_its_check_images(tiny_net):
    _, report = _eptq(tiny_net, bits=2, iterations=30, keep_best=True)
    r = report.rounding
    assert r["kept"] in ("eptq", "rtn")
    assert min(r["check_loss"], r["rtn_check_loss"]) == (
        r["check_loss"] if r["kept"] == "eptq" else r["rtn_check_loss"]
    )


def test_plain_mean_weights_need_no_lfh(tiny_net):
    qgm, report = _eptq(tiny_net, iterations=5, loss_weights="mean")
    assert "LFH" not in report.stage_seconds and report.rounding["loss_weights"] == "mean"


def test_resume_after_an_interrupt_gives_the_same_model(tiny_net, tmp_path, monkeypatch):
    settings = {"iterations": 24, "checkpoint_every": 8}
    straight, _ = _eptq(tiny_net, checkpoint_dir=str(tmp_path / "a"), **settings)

    real = rounding_pass.batch_indices

    def interrupt_at_step_13(n, batch, step, seed):
        if step == 13:
            raise KeyboardInterrupt
        return real(n, batch, step, seed)

    monkeypatch.setattr(rounding_pass, "batch_indices", interrupt_at_step_13)
    with pytest.raises(KeyboardInterrupt):
        _eptq(tiny_net, checkpoint_dir=str(tmp_path / "b"), **settings)
    monkeypatch.setattr(rounding_pass, "batch_indices", real)
    assert torch.load(tmp_path / "b" / "rounding.pt", weights_only=False)["step"] == 8
    resumed, report = _eptq(tiny_net, checkpoint_dir=str(tmp_path / "b"), resume=True, **settings)
    assert report.rounding["resumed_at"] == 8
    for (name, a), b in zip(_quant_layers(straight).items(), _quant_layers(resumed).values()):
        assert torch.equal(a.layer.weight, b.layer.weight), name
        assert torch.equal(a.layer.bias, b.layer.bias), name


def test_resume_refuses_a_checkpoint_of_another_run(tiny_net, tmp_path):
    _eptq(tiny_net, iterations=8, checkpoint_every=4, checkpoint_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="different run"):
        _eptq(tiny_net, iterations=16, checkpoint_every=4, checkpoint_dir=str(tmp_path), resume=True)


def test_bad_rounding_settings_are_refused():
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        RoundingConfig(resume=True)
    with pytest.raises(ConfigError, match="warmup"):
        RoundingConfig(warmup=1.5)
    with pytest.raises(ConfigError, match="loss_weights"):
        RoundingConfig(loss_weights="hessian")


def test_schedule_and_sampler():
    cfg = RoundingConfig(iterations=100, warmup=0.2, beta=(20.0, 2.0))
    assert beta_at(19, cfg) is None and beta_at(20, cfg) == 20.0 and beta_at(100, cfg) == pytest.approx(2.0)
    seen = torch.cat([batch_indices(10, 3, s, seed=0) for s in range(3)])
    assert len(set(seen.tolist())) == 9  # one epoch: no image twice
    assert torch.equal(batch_indices(10, 3, 7, 0), batch_indices(10, 3, 7, 0))
    assert len(batch_indices(2, 5, 0, 0)) == 5  # fewer images than a batch: repeated
    assert LossWeights("mean") is LossWeights.MEAN


def test_teacher_cache_matches_recomputing_the_teacher(tiny_net):
    _, cached = _eptq(tiny_net, iterations=12, teacher_cache="on")
    _, recomputed = _eptq(tiny_net, iterations=12, teacher_cache="off")
    assert cached.rounding["teacher_cache"] and not recomputed.rounding["teacher_cache"]
    a, b = _losses(cached), _losses(recomputed)
    assert a == pytest.approx(b, rel=2e-2)  # fp16 targets: the same run up to their rounding


def test_trainable_weight_steps_move_and_stay_consistent(tiny_net, tmp_path):
    rtn, _ = fxq.quantize(tiny_net, CALIB, PTQConfig(target=INT8.with_bits(3), progress=False))
    qgm, _ = _eptq(tiny_net, iterations=30, train_scale=True, lr_scale=0.05, checkpoint_dir=str(tmp_path))
    moved = False
    for a, b in zip(_quant_layers(rtn).values(), _quant_layers(qgm).values()):
        moved |= not torch.equal(a.scale, b.scale)
        w = b.layer.weight.detach()
        assert torch.equal((w / b.scale_like(w)).round() * b.scale_like(w), w)  # on the trained grid
        assert b.scale_factor is None
    assert moved
    assert "scale_factor" in torch.load(tmp_path / "rounding.pt", weights_only=False)["layers"][0]


def test_the_optimized_model_exports_and_trains_with_the_fused_kernel_only_inside(tiny_net, monkeypatch):
    seen = []
    real = torch.fake_quantize_per_tensor_affine
    monkeypatch.setattr(torch, "fake_quantize_per_tensor_affine", lambda *a: seen.append(1) or real(*a))
    qgm, _ = _eptq(tiny_net, iterations=3)
    assert seen  # the optimization trained with torch's fused kernel
    assert not any(getattr(m, "fused_kernel", False) for m in qgm.modules())  # and handed back the formula
    x = seeded(2, 3, 16, 16, seed=4)
    ep = torch.export.export(qgm, (x,))  # torch.export cannot trace the fused kernel: it must be off
    torch.testing.assert_close(ep.module()(x), qgm(x))


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv2d(4, 6, 3),
        nn.Conv2d(4, 6, 3, groups=2),
        nn.Conv2d(6, 6, 3, groups=6),
        nn.Conv1d(4, 6, 3),
        nn.Linear(5, 3),
    ],
    ids=["conv", "grouped", "depthwise", "conv1d", "linear"],
)
def test_mean_output_shift_is_the_output_change_of_a_constant_input(layer):
    # an input constant per channel (no padding) makes every output position read E[x]: the output moves by
    # exactly the shift when the weight moves by dw
    torch.manual_seed(0)
    x_mean, dw = torch.randn(layer.weight.shape[1] * getattr(layer, "groups", 1)), 0.1 * torch.randn_like(layer.weight)
    x = x_mean.reshape(1, -1, *([1] * (layer.weight.dim() - 2))).expand(2, -1, *([5] * (layer.weight.dim() - 2)))
    w, b = layer.weight.detach(), layer.bias.detach()
    moved = layer_forward(layer, x, w + dw, b) - layer_forward(layer, x, w, b)
    shift = mean_output_shift(layer, dw, x_mean)
    torch.testing.assert_close(moved, shift.reshape(1, -1, *([1] * (moved.dim() - 2))).expand_as(moved))


def test_soft_weights_equal_the_clamped_adaround_form_and_its_gradient():
    # w = s * clamp(floor(w/s) + h(V), qmin, qmax), with clipped weights and V on both sides of 0; fxq computes
    # it as clamp(floor) + free * h (no clamp per step): the same values, codes and gradients
    layer = nn.Conv2d(8, 6, 3)
    spec = QSpec(3, signed=True, per_channel=True)
    qw = QuantWeight(layer, spec, 0.5 * layer.weight.detach().abs().amax((1, 2, 3)))  # half the range: clipping
    qw.start_soft_rounding_()
    with torch.no_grad():
        qw.rounding.copy_(seeded(*qw.rounding.shape, seed=3) * 4)
    w = layer.weight.detach()
    floor = torch.floor(w / qw.scale_like(w))
    assert (floor >= spec.qmax).any() and (floor < spec.qmin - 1).any()
    ref_v = qw.rounding.detach().clone().requires_grad_()
    h = torch.clamp(torch.sigmoid(ref_v) * 1.2 - 0.1, 0, 1)
    ref = torch.clamp(floor + h, spec.qmin, spec.qmax) * qw.scale_like(w)
    soft = qw.quantized_weight()
    torch.testing.assert_close(soft, ref, rtol=0, atol=0)
    g = seeded(*w.shape, seed=4)
    (soft * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(qw.rounding.grad, ref_v.grad)
    up = (qw.rounding.detach() >= 0).float()
    assert torch.equal(qw.hard_codes(), torch.clamp(floor + up, spec.qmin, spec.qmax))


def test_live_bias_correction_of_the_soft_weights():
    layer = nn.Conv2d(4, 6, 3)
    spec = QSpec(4, signed=True, per_channel=True)
    qw = QuantWeight(layer, spec, weight_thresholds(layer.weight.detach(), spec))
    x_mean = seeded(4, seed=5)
    qw.correct_bias_(x_mean)
    qw.start_soft_rounding_()
    with torch.no_grad():
        qw.rounding.add_(seeded(*qw.rounding.shape, seed=6))
    x = seeded(2, 4, 7, 7, seed=7)
    w_soft, w = qw.quantized_weight(), layer.weight.detach()
    expect = layer_forward(layer, x, w_soft, layer.bias - mean_output_shift(layer, w_soft - w, x_mean))
    torch.testing.assert_close(qw(x), expect, rtol=1e-5, atol=1e-5)


def test_the_regulariser_reuses_the_forwards_soft_targets_with_the_same_gradient():
    layers = [QuantWeight(nn.Linear(5, 4), QSpec(4, per_channel=True), torch.ones(4)) for _ in range(2)]
    for qw in layers:
        qw.start_soft_rounding_()
    fresh = rounding_pass.rounding_regularizer(layers, 8.0)  # no forward yet: computed from V
    grads_fresh = torch.autograd.grad(fresh, [qw.rounding for qw in layers])
    with torch.no_grad():
        layers[0](torch.ones(1, 5))  # no gradients: nothing kept
    assert layers[0].last_soft_targets is None
    for qw in layers:
        qw(torch.ones(1, 5))
    assert all(qw.last_soft_targets is not None for qw in layers)
    reused = rounding_pass.rounding_regularizer(layers, 8.0)
    torch.testing.assert_close(reused, fresh)
    for a, b in zip(torch.autograd.grad(reused, [qw.rounding for qw in layers]), grads_fresh):
        torch.testing.assert_close(a, b)
    layers[0].end_soft_rounding_()
    assert layers[0].last_soft_targets is None and layers[0].rounding is None


def test_distillation_loss_is_the_mean_weighted_per_sample_squared_error():
    zf = [seeded(4, 3, 5, 5, seed=1), seeded(4, 7, seed=2), seeded(2, 4, 6, seed=3)]  # the last: batch 2
    zq = [z + 0.1 * seeded(*z.shape, seed=9) for z in zf]
    w = torch.tensor([[1.0, 2.0, 0.5], [0.0, 1.0, 0.0]])

    def per_sample(a):
        return a.square().flatten(1).sum(1).mean()

    for normalize in (True, False):
        terms = torch.stack([per_sample(a - b) / (per_sample(a) if normalize else 1) for a, b in zip(zf, zq)])
        got = rounding_pass.distillation_loss(zf, zq, w, normalize)
        torch.testing.assert_close(got, (w * terms).mean(-1))
        torch.testing.assert_close(rounding_pass.distillation_loss(zf, zq, w[0], normalize), got[0])
