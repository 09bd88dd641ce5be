"""The output-error weight threshold (WeightError.OUTPUT): what it weighs, and that it lowers the layer's
output error where input channels differ in spread."""

import pytest
import torch
from torch import nn

import fxq
from fxq.quant.modules import QuantWeight
from fxq.quant.qmath import QSpec, fake_quant, input_importance, scale_for, weight_thresholds
from tests.conftest import seeded

W4 = QSpec(4, signed=True, per_channel=True)


def _quantized(w, spec, importance=None):
    return fake_quant(w, scale_for(weight_thresholds(w, spec, 64, importance), spec), spec)


def test_importance_maps_each_weight_to_its_input_channel_in_grouped_convs():
    conv = nn.Conv2d(6, 4, 3, groups=2)  # weight [4, 3, 3, 3]: outputs 0-1 read inputs 0-2, outputs 2-3 read 3-5
    energy = torch.arange(1.0, 7.0)
    imp = input_importance(conv.weight.shape, conv.groups, energy)
    assert imp.shape == conv.weight.shape
    for o in range(4):
        for j in range(3):
            assert bool((imp[o, j] == energy[(o // 2) * 3 + j]).all())
    lin = input_importance(torch.Size([5, 3]), 1, torch.tensor([1.0, 2.0, 3.0]))
    assert bool((lin == torch.tensor([1.0, 2.0, 3.0])).all())


def test_uniform_or_zero_importance_is_plain_mse():
    w = seeded(8, 16, 3, 3)
    plain = weight_thresholds(w, W4)
    torch.testing.assert_close(weight_thresholds(w, W4, importance=torch.full_like(w, 3.0)), plain)
    torch.testing.assert_close(weight_thresholds(w, W4, importance=torch.zeros_like(w)), plain)


def test_output_error_threshold_lowers_the_layers_output_error():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    w[:, :4] *= 6  # large weights on the inputs that barely move: MSE spends its range on them
    std = torch.ones(64)
    std[:4] = 0.01
    x = torch.randn(4096, 64) * std
    energy = x.var(0, unbiased=False)
    ref = x @ w.T

    def output_error(wq):
        return float((x @ wq.T - ref).square().mean())

    by_weight = output_error(_quantized(w, W4))
    by_output = output_error(_quantized(w, W4, input_importance(w.shape, 1, energy)))
    assert by_output < 0.7 * by_weight


def test_quantize_uses_the_observed_input_variance(tiny_net):
    calib = [seeded(8, 3, 16, 16, seed=i) for i in range(2)]
    cfg = fxq.PTQConfig(target=fxq.INT8.with_bits(4), weight_error="output", progress=False)
    qgm, _ = fxq.quantize(tiny_net, calib, cfg)
    plain, _ = fxq.quantize(tiny_net, calib, fxq.PTQConfig(target=fxq.INT8.with_bits(4), progress=False))
    head = qgm.get_submodule("head")
    assert isinstance(head, QuantWeight)
    # the head's input, recomputed from the float model on the same images
    feats = []
    hook = tiny_net.head.register_forward_hook(lambda m, a, o: feats.append(a[0]))
    with torch.no_grad():
        tiny_net(torch.cat(calib))
    hook.remove()
    energy = feats[0].var(0, unbiased=False)
    w = tiny_net.head.weight.detach()
    expected = weight_thresholds(w, head.spec, 64, input_importance(w.shape, 1, energy))
    threshold = head.scale * head.spec.levels_per_threshold  # the module owns its step
    torch.testing.assert_close(threshold, expected, rtol=1e-4, atol=1e-6)
    assert not torch.equal(plain.get_submodule("head").scale, head.scale)


def test_weight_error_is_validated():
    with pytest.raises(fxq.ConfigError, match="weight_error must be one of"):
        fxq.PTQConfig(weight_error="hessian")
