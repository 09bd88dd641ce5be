"""Soft rounding in flat tensors: the clamped AdaRound form per layer, its gradient, the live bias correction,
the regulariser's reuse, hardening, memory layouts and state round trips."""

import pytest
import torch
from torch import nn

from fxq.eptq.soft_rounding import SoftRounding, rectified_sigmoid, rounding_penalty
from fxq.errors import ConfigError
from fxq.quant.modules import QuantWeight, layer_forward, mean_output_shift
from fxq.quant.qmath import QSpec, weight_thresholds
from tests.conftest import seeded


def _quant(layer: nn.Module, bits: int = 4, clip: float = 1.0) -> QuantWeight:
    spec = QSpec(bits, signed=True, per_channel=True)
    w = layer.weight.detach()
    return QuantWeight(layer, spec, clip * weight_thresholds(w, spec))


def _network() -> list[QuantWeight]:
    """Layers of every kind, a channels-last conv among them, three of them bias-corrected, one clipped."""
    torch.manual_seed(0)
    layers = [
        _quant(nn.Conv2d(4, 6, 3), bits=3, clip=0.5),
        _quant(nn.Conv2d(6, 6, 3, groups=3).to(memory_format=torch.channels_last)),
        _quant(nn.Conv2d(6, 6, 3, groups=6, bias=False)),
        _quant(nn.Conv1d(4, 5, 3)),
        _quant(nn.Linear(5, 3)),
    ]
    for i in (0, 1, 4):
        layers[i].correct_bias_(
            seeded(layers[i].layer.weight.shape[1] * layers[i].layer.groups if i < 4 else 5, seed=i)
        )
    return layers


def _reference(qw: QuantWeight, v: torch.Tensor, factor: torch.Tensor | None = None) -> torch.Tensor:
    """AdaRound's form as written: s * clamp(floor(w/s) + h(V), qmin, qmax), V in the weight's shape."""
    w = qw.layer.weight.detach()
    s = qw.scale_like(w) if factor is None else qw.scale_like(w) * factor.reshape(qw.scale_like(w).shape)
    floor = torch.floor(w / qw.scale_like(w))
    h = torch.clamp(torch.sigmoid(v) * 1.2 - 0.1, 0, 1)
    return torch.clamp(floor + h, qw.spec.qmin, qw.spec.qmax) * s


def _layer_v(soft: SoftRounding, i: int) -> torch.Tensor:
    """Layer i's V, in its weight's shape, read through the soft weights' own layout."""
    start = sum(soft.sizes[:i])
    v = soft.v.detach()[start : start + soft.sizes[i]]
    w = soft.layers[i].layer.weight
    order = sorted(range(w.dim()), key=lambda d: (-w.stride(d), d))
    return v.view([w.shape[d] for d in order]).permute(sorted(range(w.dim()), key=order.__getitem__))


def test_soft_weight_at_init_equals_the_float_weight_inside_the_grid():
    layers = _network()
    soft = SoftRounding(layers)
    soft.refresh()
    for qw in layers:
        w = qw.layer.weight.detach()
        inside = (w / qw.scale_like(w)).abs() < qw.spec.qmax - 0.01  # clipped weights cannot equal their float value
        assert inside.float().mean() > 0.3
        torch.testing.assert_close(qw.quantized_weight()[inside], w[inside], rtol=0, atol=1e-5)
        assert qw.quantized_weight().stride() == w.stride()  # the layer's own memory layout (channels last here)


def test_the_two_codes_around_a_weight_stay_on_the_grid():
    qw = _quant(nn.Linear(6, 1, bias=False), bits=3)  # codes -4..3
    with torch.no_grad():
        qw.scale.fill_(1.0)
        qw.layer.weight.copy_(torch.tensor([[-9.0, -4.0, -3.5, 0.2, 3.0, 7.5]]))
    lower, free = qw.rounding_bounds()
    assert lower.tolist() == [[-4, -4, -4, 0, 3, 3]] and free.tolist() == [[0, 1, 1, 1, 0, 0]]


def test_soft_weights_equal_the_clamped_adaround_form_and_its_gradient():
    # flat V over five layers, with clipped weights, V on both sides of 0 and trainable steps: the same values,
    # gradients (V and step factors) and codes as the per-layer clamped form
    layers = _network()
    soft = SoftRounding(layers, train_scale=True)
    with torch.no_grad():
        soft.v.copy_(seeded(len(soft.v), seed=3) * 4)
        soft.scale_factor.copy_(1 + 0.1 * seeded(len(soft.scale_factor), seed=8))
    w0 = layers[0].layer.weight.detach()
    floor0 = torch.floor(w0 / layers[0].scale_like(w0))
    assert (floor0 >= layers[0].spec.qmax).any() and (floor0 < layers[0].spec.qmin - 1).any()
    soft.refresh()
    refs_v = [_layer_v(soft, i).clone().requires_grad_() for i in range(len(layers))]
    refs_f = [f.detach().clone().requires_grad_() for f in soft.scale_factor.split(soft.channels)]
    got = ref = 0
    for i, qw in enumerate(layers):
        g = seeded(*qw.layer.weight.shape, seed=10 + i)
        r = _reference(qw, refs_v[i], refs_f[i])
        torch.testing.assert_close(qw.quantized_weight(), r, rtol=1e-6, atol=1e-6)
        got, ref = got + (qw.quantized_weight() * g).sum(), ref + (r * g).sum()
    got.backward()
    ref.backward()
    for i in range(len(layers)):
        start = sum(soft.sizes[:i])
        grad = soft.v.grad[start : start + soft.sizes[i]]
        torch.testing.assert_close(grad, refs_v[i].grad.permute(*soft._orders[i]).reshape(-1))
    torch.testing.assert_close(soft.scale_factor.grad, torch.cat([f.grad for f in refs_f]))
    for i, qw in enumerate(layers):
        w = qw.layer.weight.detach()
        up = (_layer_v(soft, i) >= 0).float()
        assert torch.equal(
            qw.hard_codes(), torch.clamp(torch.floor(w / qw.scale_like(w)) + up, qw.spec.qmin, qw.spec.qmax)
        )


def test_live_bias_correction_of_the_soft_weights():
    layers = _network()
    means = [qw.input_mean for qw in layers]
    float_biases = [None if qw.float_bias is None else qw.float_bias.clone() for qw in layers]
    soft = SoftRounding(layers)
    with torch.no_grad():
        soft.v.add_(seeded(len(soft.v), seed=6))
    soft.refresh()
    x = seeded(2, 4, 9, 9, seed=7)
    qw = layers[0]
    w_soft, w = qw.quantized_weight(), qw.layer.weight.detach()
    expect = layer_forward(qw.layer, x, w_soft, float_biases[0] - mean_output_shift(qw.layer, w_soft - w, means[0]))
    torch.testing.assert_close(qw(x), expect, rtol=1e-5, atol=1e-5)
    for qw, mean, fb in zip(layers, means, float_biases):
        b = qw.live[1]
        if mean is None:  # no correction: the layer's own bias (zeros where it had none)
            torch.testing.assert_close(b, qw.ensure_bias().detach())
        else:
            w_soft, w = qw.quantized_weight(), qw.layer.weight.detach()
            torch.testing.assert_close(b, fb - mean_output_shift(qw.layer, w_soft - w, mean), rtol=1e-5, atol=1e-6)


def test_the_regulariser_reuses_the_steps_soft_targets_with_the_same_gradient():
    layers = [QuantWeight(nn.Linear(5, 4), QSpec(4, per_channel=True), torch.ones(4)) for _ in range(2)]
    soft = SoftRounding(layers)
    with torch.no_grad():
        soft.v.add_(seeded(len(soft.v), seed=2))
    fresh = soft.regularizer(8.0)  # no refresh yet: computed from V
    expect = (1 - (2 * rectified_sigmoid(soft.v) - 1).abs().pow(8.0)).sum()
    torch.testing.assert_close(fresh, expect)
    (grad_fresh,) = torch.autograd.grad(fresh, [soft.v])
    with torch.no_grad():
        soft.refresh()  # no gradients: nothing to reuse
    assert soft._h is not None and not soft._h.requires_grad
    soft.refresh()
    reused = soft.regularizer(8.0)
    assert reused.grad_fn is not None and soft._h.requires_grad
    torch.testing.assert_close(reused, fresh)
    torch.testing.assert_close(torch.autograd.grad(reused, [soft.v])[0], grad_fresh)
    with torch.no_grad():
        soft.v.add_(1.0)  # an optimizer step: the kept h(V) is stale and must not be reused
    torch.testing.assert_close(soft.regularizer(8.0), (1 - (2 * rectified_sigmoid(soft.v) - 1).abs().pow(8.0)).sum())


def test_harden_writes_codes_and_corrected_bias_and_close_leaves_layers_alone():
    layers = _network()
    before = [(qw.layer.weight.detach().clone(), qw.ensure_bias().detach().clone()) for qw in layers]
    soft = SoftRounding(layers)
    with torch.no_grad():
        soft.v.add_(seeded(len(soft.v), seed=4))
        soft.bias.add_(0.01)
    soft.close()
    for qw, (w, b) in zip(layers, before):  # closed without hardening: untouched
        assert torch.equal(qw.layer.weight, w) and torch.equal(qw.layer.bias, b)
        assert qw.soft_codes is None and qw.live is None
    soft = SoftRounding(layers)
    with torch.no_grad():
        soft.v.add_(seeded(len(soft.v), seed=4))
        soft.bias.add_(0.01)
    soft.refresh()
    codes = [qw.hard_codes() for qw in layers]
    trained = [b.detach().clone() for b in soft.bias.split(soft.channels)]
    corrected = [(qw.input_mean, qw.layer.weight.detach().clone()) for qw in layers]
    soft.harden_()
    for qw, c, b, (mean, w_float) in zip(layers, codes, trained, corrected):
        w = qw.layer.weight.detach()
        assert torch.equal(w, c * qw.scale_like(w)) and torch.equal(qw.hard_codes(), c)
        shift = 0 if mean is None else mean_output_shift(qw.layer, w - w_float, mean)
        torch.testing.assert_close(qw.layer.bias.detach(), b - shift)
        assert qw.soft_codes is None and qw.live is None and qw.input_mean is None


def test_state_round_trip_and_refusals():
    layers = _network()
    soft = SoftRounding(layers, train_scale=True)
    with torch.no_grad():
        soft.v.add_(1.0)
        soft.scale_factor.mul_(1.1)
    state = soft.state_dict()
    soft.close()
    other = SoftRounding(layers, train_scale=True)
    other.load_state_dict(state)
    for a, b in zip(other.parameters(), state.values()):
        assert torch.equal(a.detach(), b)
    with pytest.raises(ConfigError, match="already soft-rounding"):
        SoftRounding(layers[:2])
    with pytest.raises(ConfigError, match="refresh"):
        layers[3](seeded(1, 4, 6, seed=1))
    other.close()
    with pytest.raises(ConfigError, match="shape"):
        SoftRounding(layers[:2], train_scale=True).load_state_dict(state)


@pytest.mark.parametrize("beta", [20.0, 7.5, 2.0, 1.0])
def test_the_rounding_penalty_and_its_gradient_are_the_formulas(beta):
    """The hand-written penalty against autograd through the plain formula, h on both sides of 1/2, at 1/2 (where
    the power's log is -inf) and at 0 and 1."""
    h = torch.cat([torch.rand(64, dtype=torch.float64), torch.tensor([0.0, 1.0, 0.25, 0.75, 0.5], dtype=torch.float64)])
    plain = h.clone().requires_grad_()
    ours = h.clone().requires_grad_()
    want = (1 - (2 * plain - 1).abs().pow(beta)).sum()
    got = rounding_penalty(ours, beta)
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(ours.grad, plain.grad)
    assert torch.autograd.gradcheck(
        lambda t: rounding_penalty(t, beta), (torch.rand(16, dtype=torch.float64) * 0.98 + 0.01).requires_grad_()
    )
