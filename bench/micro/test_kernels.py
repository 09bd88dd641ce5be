"""Micro-benchmarks of fxq's own kernels on small realistic sizes (CPU, seeded; CUDA ones skip without a device).

Every benchmark checks its result, so a kernel that got fast by computing something else fails instead of
showing up as a speed-up. See README.md for running, saving and comparing.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import fxq
from fxq.backends.check import output_step
from fxq.backends.inductor import FrozenCompiled, int8_inductor_available
from fxq.backends.onnx import export_float_onnx, ort_session
from fxq.eptq.distillation import Workspace, column_lengths, distillation_loss, pack, packed_loss
from fxq.eptq.soft_rounding import SoftRounding, rectified_sigmoid, rounding_penalty
from fxq.kernels import lfh_cuda
from fxq.kernels.lfh import LFHReducer
from fxq.kernels.lfh_reduce import RunningStats, fused_update_reference_
from fxq.quant import qmath
from fxq.quant.modules import QuantWeight
from fxq.quant.qmath import QSpec, fake_quant, fake_quant_trained_input, scale_for, weight_thresholds
from fxq.targets import cpu_description

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# ---------------------------------------------------------------------------------------------------------------
# 1. The LFH reduction: 50 interest tensors' gradients of one backward (batch 32) into running statistics

N_GRADS, GRAD_SHAPE = 50, (32, 16, 8, 8)
MIN_COUNT, REL_TOL = 16, 1e-2


def _grads(seeded, device="cpu") -> list[torch.Tensor]:
    return [(seeded(*GRAD_SHAPE, seed=i) * (1 + i / N_GRADS)).to(device) for i in range(N_GRADS)]


def _state(n: int, device="cpu"):
    return (
        RunningStats.zeros(n, device),
        torch.full((n,), math.inf, dtype=torch.float64, device=device),
        torch.zeros(n, dtype=torch.bool, device=device),
    )


def _expected_mean(grads: list[torch.Tensor]) -> torch.Tensor:
    """The running mean after any number of identical backwards: each tensor's mean per-sample sum of squares."""
    return torch.stack([g.detach().cpu().double().square().flatten(1).sum(1).mean() for g in grads])


def _check_stats(stats: RunningStats, grads: list[torch.Tensor], calls: int) -> None:
    count = stats.count.cpu()
    assert torch.equal(count, torch.full_like(count, float(calls * GRAD_SHAPE[0])))
    torch.testing.assert_close(stats.mean.cpu(), _expected_mean(grads), rtol=1e-5, atol=0)
    assert torch.isfinite(stats.m2).all() and (stats.m2 > 0).all()


def _counted(fn):
    """fn with a call counter (benchmarks run it an unknown number of times; the checks need the count)."""

    def run():
        run.calls += 1
        fn()

    run.calls = 0
    return run


@pytest.mark.benchmark(group="lfh-reduce")
def test_lfh_reduce_reference_50_tensors(benchmark, seeded):
    grads = _grads(seeded)
    stats, moved, converged = _state(N_GRADS)
    rows = torch.arange(N_GRADS)
    run = _counted(lambda: fused_update_reference_(grads, rows, stats, moved, converged, MIN_COUNT, REL_TOL))
    benchmark(run)
    _check_stats(stats, grads, run.calls)
    assert torch.isfinite(moved).all()


@pytest.mark.benchmark(group="lfh-reduce")
def test_lfh_reducer_cpu_add_finish_50_tensors(benchmark, seeded):
    grads = _grads(seeded)
    reducer = LFHReducer(N_GRADS, GRAD_SHAPE[0], "cpu", MIN_COUNT, REL_TOL, fused=None)

    def backward():  # what the backward hooks and the step after it do
        for row, g in enumerate(grads):
            reducer.add(row, g)
        reducer.finish()

    run = _counted(backward)
    benchmark(run)
    _check_stats(reducer.stats, grads, run.calls)


@needs_cuda
@pytest.mark.benchmark(group="lfh-reduce")
def test_lfh_reduce_cuda_kernel_50_tensors(benchmark, seeded):
    fused = lfh_cuda.fused_update_for("cuda")
    if fused is None:
        pytest.skip("the fused LFH kernel does not build here (see the warning)")
    grads = _grads(seeded, "cuda")
    stats, moved, converged = _state(N_GRADS, "cuda")
    rows = torch.arange(N_GRADS)

    def update():
        fused(grads, rows, stats, moved, converged, MIN_COUNT, REL_TOL)
        torch.cuda.synchronize()

    run = _counted(update)
    benchmark(run)
    _check_stats(stats, grads, run.calls)


# ---------------------------------------------------------------------------------------------------------------
# 1b. The per-channel weight threshold search (64 candidates) on a (512, 512, 3, 3) conv weight: fxq's search,
# which walks blocks of rows that stay in cache, against the same code with the whole weight as one block


def _whole_weight_search(w: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """The same search with every row in one block (the whole weight streams from memory once per candidate)."""
    saved, qmath._SEARCH_CHUNK = qmath._SEARCH_CHUNK, w.numel()
    try:
        return weight_thresholds(w, spec)
    finally:
        qmath._SEARCH_CHUNK = saved


@pytest.fixture(scope="module")
def big_weight():
    return torch.randn(512, 512, 3, 3, generator=torch.Generator().manual_seed(5))


def test_weight_threshold_search_blocked(benchmark, big_weight):
    t = benchmark.pedantic(weight_thresholds, args=(big_weight, W_SPEC), rounds=3, iterations=1)
    torch.testing.assert_close(t, _whole_weight_search(big_weight, W_SPEC), rtol=0, atol=0)


def test_weight_threshold_search_whole_weight(benchmark, big_weight):
    t = benchmark.pedantic(_whole_weight_search, args=(big_weight, W_SPEC), rounds=3, iterations=1)
    assert t.shape == (512,) and bool((t > 0).all())


# ---------------------------------------------------------------------------------------------------------------
# 2. Fake quantization, forward and backward (straight-through)

W_SPEC = QSpec(8, signed=True, per_channel=True)
A_SPEC = QSpec(8, signed=True, per_channel=False)


def _clipped_thresholds(w: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """Per-channel thresholds that clip some weights, as an MSE search's do (the search itself takes seconds on
    two threads and is not what these benchmarks time)."""
    return 0.8 * w.detach().abs().flatten(1).amax(1) if spec.per_channel else 0.8 * w.detach().abs().amax()


@pytest.fixture
def conv_weight(seeded):
    """A (64, 64, 3, 3) conv weight and its per-channel steps."""
    w = seeded(64, 64, 3, 3, seed=1) * 0.05
    return w, scale_for(_clipped_thresholds(w, W_SPEC), W_SPEC)


def _activation(seeded):
    x = seeded(32, 64, 28, 28, seed=2)
    return x, scale_for(x.abs().amax() * 0.9, A_SPEC)  # some clipping, as an MSE threshold has


def _check_on_grid(out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, spec: QSpec) -> None:
    s = scale.reshape(-1, *([1] * (x.dim() - 1))) if spec.per_channel else scale
    codes = out.detach() / s
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert (codes - codes.round()).abs().max() < 1e-3
    assert codes.min() >= spec.qmin - 1e-3 and codes.max() <= spec.qmax + 1e-3
    inside = (x.detach() / s).abs() < spec.qmax
    assert ((out.detach() - x.detach()).abs() <= s / 2 * (1 + 1e-4))[inside].all()  # round to nearest


def _check_ste_grad(x: torch.Tensor, scale: torch.Tensor, spec: QSpec) -> None:
    s = scale.reshape(-1, *([1] * (x.dim() - 1))) if spec.per_channel else scale
    xs = x.detach() / s
    xr = xs + (torch.round(xs) - xs)  # the clamp sees the rounded value, as fake_quant computes it
    inside, outside = (xr > spec.qmin) & (xr < spec.qmax), (xr < spec.qmin) | (xr > spec.qmax)
    assert inside.any() and outside.any()  # both sides of the clipping range are exercised
    assert ((x.grad == 0) | (x.grad == 1)).all()  # straight through or stopped; codes on the bounds either
    assert (x.grad[inside] == 1).all() and (x.grad[outside] == 0).all()


@pytest.mark.benchmark(group="fake-quant")
def test_fake_quant_weight_per_channel_forward(benchmark, conv_weight):
    w, s = conv_weight
    out = benchmark(fake_quant, w, s, W_SPEC)
    _check_on_grid(out, w, s, W_SPEC)


def _bench_ste_backward(benchmark, x: torch.Tensor, scale: torch.Tensor, spec: QSpec, quantize) -> None:
    """Time `quantize(x, scale, spec)` and `.sum().backward()`, then check its straight-through gradient."""
    x.requires_grad_()

    def step():
        x.grad = None
        quantize(x, scale, spec).sum().backward()

    benchmark(step)
    _check_ste_grad(x, scale, spec)


@pytest.mark.benchmark(group="fake-quant")
def test_fake_quant_weight_per_channel_backward(benchmark, conv_weight):
    w, s = conv_weight
    _bench_ste_backward(benchmark, w.clone(), s, W_SPEC, fake_quant)


@pytest.mark.benchmark(group="fake-quant")
def test_fake_quant_activation_per_tensor_forward(benchmark, seeded):
    x, s = _activation(seeded)
    out = benchmark(fake_quant, x, s, A_SPEC)
    _check_on_grid(out, x, s, A_SPEC)


@pytest.mark.benchmark(group="fake-quant")
def test_fake_quant_activation_per_tensor_backward(benchmark, seeded):
    x, s = _activation(seeded)
    _bench_ste_backward(benchmark, x, s, A_SPEC, fake_quant)


@pytest.mark.benchmark(group="fake-quant-training")
def test_fake_quant_activation_training_kernels_backward(benchmark, seeded):
    x, s = _activation(seeded)
    x = x.contiguous(memory_format=torch.channels_last)  # as the rounding's steps run
    _bench_ste_backward(benchmark, x, s, A_SPEC, fake_quant_trained_input)


@pytest.mark.benchmark(group="fake-quant-training")
def test_fake_quant_activation_torch_fused_kernel_backward(benchmark, seeded):
    x, s = _activation(seeded)
    zero = torch.zeros((), dtype=torch.int32)

    def fused(x, scale, spec):
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, spec.qmin, spec.qmax)

    _bench_ste_backward(benchmark, x.contiguous(memory_format=torch.channels_last), s, A_SPEC, fused)


# ---------------------------------------------------------------------------------------------------------------
# 3. Soft rounding (AdaRound in flat tensors) over 10 conv layers of 32-64 channels

CHANNELS = [3, 32, 32, 48, 48, 64, 64, 64, 48, 48, 32]  # 10 convs, 3x3


SOFT_SPEC = QSpec(4, signed=True, per_channel=True)


@pytest.fixture
def soft(seeded):
    torch.manual_seed(0)
    layers = []
    for i, (cin, cout) in enumerate(zip(CHANNELS[:-1], CHANNELS[1:])):
        conv = nn.Conv2d(cin, cout, 3, padding=1, bias=i % 3 != 2)
        qw = QuantWeight(conv, SOFT_SPEC, _clipped_thresholds(conv.weight, SOFT_SPEC))
        if i % 2 == 0:  # half of them bias-corrected: the live correction runs too
            qw.correct_bias_(seeded(cin, seed=100 + i).abs())
        layers.append(qw)
    soft = SoftRounding(layers)
    with torch.no_grad():  # V away from its initial value, on both sides of 0
        soft.v.add_(seeded(len(soft.v), seed=3))
    yield soft
    soft.close()


def _live_loss(soft: SoftRounding) -> torch.Tensor:
    return sum(qw.live[0].square().sum() + qw.live[1].square().sum() for qw in soft.layers)


def _check_live(soft: SoftRounding) -> None:
    for qw in soft.layers:
        w, b = qw.live
        assert w.shape == qw.layer.weight.shape and b.shape == (w.shape[0],)
        assert torch.isfinite(w).all() and torch.isfinite(b).all()
        codes = w.detach() / qw.scale_like(w)
        assert codes.min() >= qw.spec.qmin - 1e-4 and codes.max() <= qw.spec.qmax + 1e-4


@pytest.mark.benchmark(group="soft-rounding")
def test_soft_rounding_refresh_10_convs(benchmark, soft):
    benchmark(soft.refresh)
    _check_live(soft)


@pytest.mark.benchmark(group="soft-rounding")
def test_soft_rounding_refresh_backward_10_convs(benchmark, soft):
    def step():
        soft.v.grad = soft.bias.grad = None
        soft.refresh()
        _live_loss(soft).backward()

    benchmark(step)
    _check_live(soft)
    assert torch.isfinite(soft.v.grad).all() and soft.v.grad.abs().sum() > 0
    assert torch.isfinite(soft.bias.grad).all() and soft.bias.grad.abs().sum() > 0


LITE0_WEIGHTS = 4_581_600  # h(V) of every quantized weight of EfficientNet-Lite0


@pytest.fixture
def lite0_h(seeded):
    return torch.sigmoid(seeded(LITE0_WEIGHTS, seed=5) * 3).requires_grad_()


@pytest.mark.benchmark(group="rounding-penalty")
def test_rounding_penalty_lite0_backward(benchmark, lite0_h):
    def step():
        lite0_h.grad = None
        rounding_penalty(lite0_h, 7.5).backward()

    benchmark(step)
    assert torch.isfinite(lite0_h.grad).all() and lite0_h.grad.abs().sum() > 0


@pytest.mark.benchmark(group="rounding-penalty")
def test_rounding_penalty_pow_formula_lite0_backward(benchmark, lite0_h):
    """The plain formula through autograd (pow with a float exponent each way): the baseline."""

    def step():
        lite0_h.grad = None
        (1 - (2 * lite0_h - 1).abs().pow(7.5)).sum().backward()

    benchmark(step)
    assert torch.isfinite(lite0_h.grad).all() and lite0_h.grad.abs().sum() > 0


@pytest.mark.benchmark(group="soft-rounding")
def test_soft_rounding_regularizer_10_convs(benchmark, soft):
    soft.refresh()  # the regulariser of a step reuses this step's h(V)
    reg = benchmark(soft.regularizer, 8.0)
    expect = (1 - (2 * rectified_sigmoid(soft.v.detach()) - 1).abs().pow(8.0)).sum()
    assert reg.grad_fn is not None
    torch.testing.assert_close(reg.detach(), expect)


@pytest.mark.benchmark(group="soft-rounding")
def test_soft_rounding_step_with_regularizer_10_convs(benchmark, soft):
    def step():  # refresh, weights' loss plus the regulariser, backward: a rounding step without the convs
        soft.v.grad = soft.bias.grad = None
        soft.refresh()
        (_live_loss(soft) + 0.01 * soft.regularizer(8.0)).backward()

    benchmark(step)
    assert torch.isfinite(soft.v.grad).all() and soft.v.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# 4. The packed distillation loss: 20 interest tensors of a batch of 8

N_Z, Z_SHAPE = 20, (8, 32, 16, 16)


@pytest.fixture
def distill(seeded):
    zf = [seeded(*Z_SHAPE, seed=200 + i) for i in range(N_Z)]
    zq = [(f + 0.1 * seeded(*Z_SHAPE, seed=300 + i)).requires_grad_() for i, f in enumerate(zf)]
    weights = torch.rand(N_Z, generator=torch.Generator().manual_seed(4)) + 0.5
    with torch.no_grad():  # the formula, per tensor: mean_z lambda_z ||Zq - Zf||^2 / ||Zf||^2
        expect = torch.stack([(q - f).square().sum() / f.square().sum() for f, q in zip(zf, zq)])
        expect = (weights * expect).mean()
    return zf, zq, weights, expect


def _check_loss(loss: torch.Tensor, expect: torch.Tensor) -> None:
    assert loss.shape == () and torch.isfinite(loss)
    torch.testing.assert_close(loss.detach(), expect, rtol=1e-4, atol=0)


def _check_grads(zf, zq, weights) -> None:
    for f, q, w in zip(zf, zq, weights):  # d/dZq of lambda ||Zq - Zf||^2 / ||Zf||^2 / n
        torch.testing.assert_close(q.grad, 2 * w * (q.detach() - f) / f.square().sum() / N_Z, rtol=1e-3, atol=1e-9)


@pytest.mark.benchmark(group="distillation-forward")
def test_distillation_packed_loss_forward_20_tensors(benchmark, distill):
    zf, zq, weights, expect = distill
    packed, lengths, ws = pack(zf), column_lengths(zf), Workspace()  # the teacher's come packed from its cache
    loss = benchmark(lambda: packed_loss(packed, zq, lengths, weights, workspace=ws))
    _check_loss(loss, expect)


@pytest.mark.benchmark(group="distillation-forward")
def test_distillation_loss_lists_forward_20_tensors(benchmark, distill):
    zf, zq, weights, expect = distill
    loss = benchmark(distillation_loss, zf, zq, weights)
    _check_loss(loss, expect)


@pytest.mark.benchmark(group="distillation-backward")
def test_distillation_packed_loss_backward_20_tensors(benchmark, distill):
    zf, zq, weights, expect = distill
    packed, lengths, ws = pack(zf), column_lengths(zf), Workspace()
    losses = []

    def step():
        for q in zq:
            q.grad = None
        loss = packed_loss(packed, zq, lengths, weights, workspace=ws)
        loss.backward()
        losses.append(loss.detach())

    benchmark(step)
    _check_loss(losses[-1], expect)
    _check_grads(zf, zq, weights)


@pytest.mark.benchmark(group="distillation-backward")
def test_distillation_loss_lists_backward_20_tensors(benchmark, distill):
    zf, zq, weights, expect = distill
    losses = []

    def step():
        for q in zq:
            q.grad = None
        loss = distillation_loss(zf, zq, weights)
        loss.backward()
        losses.append(loss.detach())

    benchmark(step)
    _check_loss(losses[-1], expect)
    _check_grads(zf, zq, weights)


# ---------------------------------------------------------------------------------------------------------------
# 5. Integer paths at batch 1, each beside its fp32 baseline: ONNX Runtime QDQ, and Inductor int8 (oneDNN)

MAX_STEPS = 4.0  # int8 vs the fake-quant reference, in output steps: ties in requantization move a step or two


class SmallConvNet(nn.Module):
    """3 convs of 32 channels on 3x32x32, global pool, a 10-class head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


@pytest.fixture(scope="module")
def int8_model():
    """The float net, its W8A8 fake-quant graph (RTN, for this CPU's integer form), a batch-1 input, the step."""
    torch.manual_seed(0)
    model = SmallConvNet().eval()
    g = torch.Generator().manual_seed(5)
    calib = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(4)]
    qgm, _ = fxq.quantize(model, calib, fxq.PTQConfig(progress=False))
    x = torch.randn(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        ref_float, ref_quant = model(x), qgm(x)
    step = output_step(qgm)
    assert step is not None and step > 0
    return model, qgm, x, ref_float, ref_quant, step


@pytest.fixture(scope="module")
def onnx_sessions(int8_model, tmp_path_factory):
    model, qgm, x, *_ = int8_model
    folder = tmp_path_factory.mktemp("onnx")
    export_float_onnx(model, (x,), folder / "fp32.onnx")
    check = fxq.export_onnx(qgm, (x[:1],), folder / "int8.onnx")
    assert check.passed
    return ort_session(str(folder / "fp32.onnx")), ort_session(str(folder / "int8.onnx"))  # torch's thread count


@pytest.fixture(scope="module")
def inductor_models(int8_model):
    if not int8_inductor_available():
        pytest.skip("int8 Inductor lowering unavailable (torchao or oneDNN missing)")
    model, qgm, x, *_ = int8_model
    torch._dynamo.reset()
    fp32, int8 = FrozenCompiled(model), fxq.compile_int8(qgm)  # the float side frozen too: packed weights both
    fp32(x), int8(x)  # the first calls compile
    return fp32, int8


def _cpu(benchmark) -> None:
    benchmark.extra_info["cpu"] = cpu_description()
    benchmark.extra_info["threads"] = torch.get_num_threads()


def _within_steps(out, ref: torch.Tensor, step: float) -> None:
    out = torch.as_tensor(np.asarray(out)) if not isinstance(out, torch.Tensor) else out
    assert out.shape == ref.shape and torch.isfinite(out).all()
    steps = float((out - ref).abs().max()) / step
    assert steps <= MAX_STEPS, f"int8 output {steps:.1f} steps from the fake-quant reference"


@pytest.mark.benchmark(group="int8-onnxruntime-batch1")
def test_onnxruntime_fp32_batch1(benchmark, int8_model, onnx_sessions):
    _cpu(benchmark)
    _, _, x, ref_float, _, _ = int8_model
    session, feed = onnx_sessions[0], {"input": x.numpy()}
    (out,) = benchmark(session.run, None, feed)
    torch.testing.assert_close(torch.from_numpy(out), ref_float, rtol=1e-4, atol=1e-5)


@pytest.mark.benchmark(group="int8-onnxruntime-batch1")
def test_onnxruntime_int8_qdq_batch1(benchmark, int8_model, onnx_sessions):
    _cpu(benchmark)
    _, _, x, _, ref_quant, step = int8_model
    session, feed = onnx_sessions[1], {"input": x.numpy()}
    (out,) = benchmark(session.run, None, feed)
    _within_steps(out, ref_quant, step)


@pytest.mark.benchmark(group="int8-inductor-batch1")
def test_inductor_fp32_frozen_batch1(benchmark, int8_model, inductor_models):
    _cpu(benchmark)
    _, _, x, ref_float, _, _ = int8_model
    out = benchmark(inductor_models[0], x)
    torch.testing.assert_close(out, ref_float, rtol=1e-4, atol=1e-5)


@pytest.mark.benchmark(group="int8-inductor-batch1")
def test_inductor_int8_batch1(benchmark, int8_model, inductor_models):
    _cpu(benchmark)
    _, _, x, _, ref_quant, step = int8_model
    out = benchmark(inductor_models[1], x)
    _within_steps(out, ref_quant, step)


def _eager_exact(benchmark, module, x, expected) -> None:
    """Time an eager module at batch 1; its output must be bit-equal to the one recorded when the model was made."""
    _cpu(benchmark)
    with torch.no_grad():
        out = benchmark(module, x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.benchmark(group="int8-eager-batch1")
def test_eager_fp32_batch1(benchmark, int8_model):
    model, _, x, ref_float, _, _ = int8_model
    _eager_exact(benchmark, model, x, ref_float)


@pytest.mark.benchmark(group="int8-eager-batch1")
def test_eager_fake_quant_reference_batch1(benchmark, int8_model):
    _, qgm, x, _, ref_quant, _ = int8_model
    _eager_exact(benchmark, qgm, x, ref_quant)
