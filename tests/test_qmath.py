import pytest
import torch

from fxq.errors import ConfigError
from fxq.quant.qmath import (
    ActThreshold,
    QSpec,
    activation_threshold,
    drop_quantization,
    fake_quant,
    fake_quant_trained_input,
    fake_quant_values,
    quantize_int,
    scale_for,
    weight_thresholds,
)
from tests.conftest import seeded, sqnr_db


@pytest.mark.parametrize("bits", range(2, 9))
def test_grid_ranges(bits):
    s, u = QSpec(bits), QSpec(bits, signed=False)
    assert (s.qmin, s.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert (u.qmin, u.qmax) == (0, 2**bits - 1)
    assert s.qmax - s.qmin + 1 == 2**bits == u.qmax - u.qmin + 1


@pytest.mark.parametrize("bits", [1, 9, 0, 3.5])
def test_bits_out_of_range(bits):
    with pytest.raises(ConfigError, match=r"bits must be an integer in \[2, 8\]"):
        QSpec(bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fake_quant_lands_on_grid_and_clips(bits):
    spec = QSpec(bits, per_channel=True)
    w = seeded(6, 5, 3, 3)
    t = torch.full((6,), 0.5)
    s = scale_for(t, spec)
    wq = fake_quant(w, s, spec)
    codes = wq / s.view(-1, 1, 1, 1)
    torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)
    assert codes.min() >= spec.qmin and codes.max() <= spec.qmax
    # values beyond the threshold clip to the grid's ends
    big = torch.full((6, 1, 1, 1), 10.0)
    torch.testing.assert_close(fake_quant(big, s, spec).flatten(), s * spec.qmax)
    torch.testing.assert_close(quantize_int(w, s, spec), codes.round(), atol=0, rtol=0)


@pytest.mark.parametrize("signed", [True, False])
def test_fake_quant_values_without_gradient_are_fake_quant_s_bit_for_bit(signed):
    spec = QSpec(8, signed=signed)
    s = scale_for(torch.tensor(2.0), spec)
    x = seeded(10_000) * 3  # inside and past the grid
    ties = (torch.arange(-300, 300) + 0.5) * s  # halfway between two codes: round half to even in both
    x = torch.cat([x, ties, -ties, torch.tensor([0.0, -0.0, 1e-30])])
    assert torch.equal(fake_quant_values(x.clone(), s, spec), fake_quant(x, s, spec))


@pytest.mark.parametrize("signed", [True, False])
def test_the_training_kernels_give_fake_quant_s_values_and_the_fused_kernel_s_gradient(signed):
    spec = QSpec(4, signed=signed)
    s = scale_for(torch.tensor(2.0), spec)
    ties = (torch.arange(-12, 12) + 0.5) * s  # halfway between two codes, and the grid's two ends' halves
    x = torch.cat([seeded(10_000) * 3, ties, torch.tensor([0.0, -0.0, 1e-30])]).reshape(-1, 1, 1)
    g = seeded(*x.shape, seed=1)
    ours = x.clone().requires_grad_()
    out = fake_quant_trained_input(ours, s, spec)
    (out * g).sum().backward()
    assert torch.equal(out, fake_quant(x, s, spec))
    codes = torch.round(x / s)
    inside = (codes >= spec.qmin) & (codes <= spec.qmax)  # a code on the grid's bound is not clipped
    assert torch.equal(ours.grad, g * inside)
    assert 0 < int(inside.sum()) < len(x) and bool((codes == spec.qmax).any())
    fused = seeded(10_000).mul(3).requires_grad_()  # torch's kernel rounds x * (1/s): no ties here
    zero = torch.zeros((), dtype=torch.int32)
    (torch.fake_quantize_per_tensor_affine(fused, s, zero, spec.qmin, spec.qmax) * g[:10_000, 0, 0]).sum().backward()
    torch.testing.assert_close(ours.grad[:10_000, 0, 0], fused.grad, rtol=0, atol=0)


def test_the_training_kernels_refuse_a_step_that_trains():
    with pytest.raises(ConfigError, match="fake_quant_learned_step"):
        fake_quant_trained_input(seeded(4), torch.tensor(0.1, requires_grad=True), QSpec(8))


@pytest.mark.parametrize("share", [0.0, 0.5, 0.9])
def test_drop_quantization_leaves_its_share_float_drawn_from_its_generator(share):
    spec = QSpec(4)
    s = scale_for(torch.tensor(2.0), spec)
    x = (seeded(20_000) * 3).to(memory_format=torch.contiguous_format).requires_grad_()
    q = fake_quant_trained_input(x, s, spec)
    out = drop_quantization(x, q, share, torch.Generator().manual_seed(3))
    moved = q.detach() != x.detach()  # elements where float and quantized differ tell which one came out
    assert torch.equal(out[moved & (out == x)], x[moved & (out == x)].detach())
    assert bool(((out == x) | (out == q)).all())
    float_share = float((out == x)[moved].float().mean())
    n = int(moved.sum())
    assert abs(float_share - share) < 4 * (share * (1 - share) / n) ** 0.5 + 1e-9  # binomial: 4 standard errors
    again = drop_quantization(x, q, share, torch.Generator().manual_seed(3))
    assert torch.equal(out, again)  # the generator alone draws it
    g = seeded(*x.shape, seed=1)
    (out * g).sum().backward()
    inside = (torch.round(x / s) >= spec.qmin) & (torch.round(x / s) <= spec.qmax)
    # float elements pass the whole gradient, quantized ones the straight-through one
    assert torch.equal(x.grad, torch.where(out.detach() == x.detach(), g, g * inside))


def test_per_channel_scales_follow_each_channel():
    w = seeded(4, 16)
    w[2] *= 100.0  # one channel far larger than the others
    spec = QSpec(8, per_channel=True)
    t = weight_thresholds(w, spec)
    assert t.shape == (4,)
    assert t[2] > 50 * t[[0, 1, 3]].max()
    assert torch.all(t <= w.abs().amax(1) * 2**7 / 127 + 1e-6)  # never beyond the no-clipping threshold


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_mse_threshold_beats_no_clipping(bits):
    w = seeded(8, 256)
    w[:, 0] = 8.0  # an outlier per channel: clipping it pays at low bits
    spec = QSpec(bits, per_channel=True)
    t_mse = weight_thresholds(w, spec)
    t_max = w.abs().amax(1) * 2 ** (bits - 1) / spec.qmax
    err = lambda t: (fake_quant(w, scale_for(t, spec), spec) - w).square().sum()  # noqa: E731
    assert err(t_mse) <= err(t_max) + 1e-6
    if bits <= 4:
        assert err(t_mse) < 0.9 * err(t_max)


def test_power_of_two_thresholds():
    spec = QSpec(4, per_channel=True, pot=True)
    t = weight_thresholds(seeded(5, 32), spec)
    torch.testing.assert_close(torch.log2(t), torch.log2(t).round())


def test_activation_threshold_minmax_and_mse():
    x = torch.cat([seeded(100_000).abs(), torch.tensor([20.0])])  # unsigned, one far outlier
    spec = QSpec(8, signed=False)
    t_minmax = activation_threshold(0.0, 20.0, x, spec, ActThreshold.MINMAX)
    assert t_minmax * spec.qmax / spec.levels_per_threshold == pytest.approx(20.0, rel=1e-5)  # covers the max
    t_mse = activation_threshold(0.0, 20.0, x, spec, ActThreshold.MSE)
    assert t_mse < t_minmax  # clips the lone outlier
    err = lambda t: (fake_quant(x, scale_for(torch.tensor(t), spec), spec) - x).square().mean()  # noqa: E731
    assert err(t_mse) < err(t_minmax)


@pytest.mark.parametrize("pot", [False, True])
def test_thresholds_do_not_depend_on_the_tensors_scale(pot):
    # a live tensor of 1e-12 or 1e-20 (random-weight nets, tiny residual branches) is searched like one of 1:
    # the same threshold relative to its range, never a floor that rounds it all to zero
    x = seeded(20000)
    spec = QSpec(8, signed=True, pot=pot)
    base = activation_threshold(float(x.min()), float(x.max()), x, spec, ActThreshold.MSE)
    for scale in (2.0**-40, 2.0**-66, 2.0**30):  # powers of two: x * scale is exact, so the search must agree
        xs = x * scale
        t = activation_threshold(float(xs.min()), float(xs.max()), xs, spec, ActThreshold.MSE)
        assert t == pytest.approx(base * scale, rel=1e-5)
        y = fake_quant(xs, scale_for(torch.tensor(t), spec), spec)
        assert sqnr_db(xs / scale, y / scale) > 35  # in units of the scale (the helper floors tiny errors)
    w = seeded(8, 30) * 1e-13
    torch.testing.assert_close(
        weight_thresholds(w, QSpec(4, per_channel=True)) * 1e13,
        weight_thresholds(w * 1e13, QSpec(4, per_channel=True)),
        rtol=1e-4,
        atol=0,
    )


def test_an_all_zero_tensor_gets_a_positive_step():
    z = torch.zeros(100)
    t = activation_threshold(0.0, 0.0, z, QSpec(8, signed=False), ActThreshold.MSE)
    assert 0 < t < 1e-20
    assert fake_quant(z, scale_for(torch.tensor(t), QSpec(8, signed=False)), QSpec(8, signed=False)).eq(0).all()
