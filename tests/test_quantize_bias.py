import pytest
import torch
from torch import nn

import fxq
from fxq.ir.ops import grid_source
from fxq.quant import bias as quantize_bias
from fxq.quant.modules import ActQuant, QuantWeight
from fxq.targets import INT8
from tests.conftest import seeded


def _quantize(model, target=INT8, **cfg):
    data = [seeded(8, *_input_shape(model), seed=i) for i in range(2)]
    return fxq.quantize(model, data, fxq.PTQConfig(target=target, progress=False, **cfg))


def _input_shape(model):
    first = next(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    return (first.in_channels, 16, 16) if isinstance(first, nn.Conv2d) else (first.in_features,)


def _biases(qgm):
    """{layer: (bias, s_x * s_w)} for every quantized layer whose input is on an activation grid."""
    found = {}
    for node in qgm.graph.nodes:
        if node.op == "call_module" and isinstance(qw := qgm.get_submodule(node.target), QuantWeight):
            src = grid_source(qgm, node.args[0], ActQuant)
            if src is not None:
                found[node.target] = (
                    qw.layer.bias.detach(),
                    quantize_bias.bias_step(qgm.get_submodule(src.target), qw),
                )
    return found


@pytest.mark.parametrize("bits", [8, 4])
def test_biases_are_int32_codes_on_the_input_times_weight_step(tiny_net, bits):
    qgm, report = _quantize(tiny_net, INT8.with_bits(bits))
    biases = _biases(qgm)
    assert sorted(biases) == ["branch", "conv_a", "head", "stem.0"]
    for name, (b, step) in biases.items():
        codes = torch.round(b / step)
        assert torch.equal(codes * step, b), name  # what an int32 export computes is the bias itself
        assert codes.abs().max() > 10 and codes.abs().max() < 2**31, name
    assert {lr.bias_bits for lr in report.layers if lr.weight_bits} == {32}


def test_the_biases_move_by_at_most_half_a_step(tiny_net):
    on, _ = _quantize(tiny_net)
    off, report = _quantize(tiny_net, fxq.Target("float-bias", bias_bits=None))
    assert {lr.bias_bits for lr in report.layers if lr.weight_bits} == {None}
    moved = 0
    for name, (b_on, step) in _biases(on).items():
        b_off = off.get_submodule(name).layer.bias.detach()
        assert torch.all((b_on - b_off).abs() <= 0.5 * step * (1 + 1e-4)), name
        moved += int((b_on != b_off).sum())
    assert moved > 0  # the float-bias target really kept float biases


def test_a_bias_that_int32_cannot_hold_stays_float():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    with torch.no_grad():
        conv[0].weight[2].fill_(1e-9)  # a dead channel: its weight step vanishes, so would the bias step
        conv[0].bias[2] = 50.0
    qgm, report = _quantize(conv, bias_correction=False)
    assert [lr.bias_bits for lr in report.layers if lr.weight_bits] == [None]
    torch.testing.assert_close(qgm.get_submodule("0").layer.bias, conv[0].bias, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [4, 33, 16.0])
def test_bad_bias_widths_are_refused(bits):
    with pytest.raises(fxq.ConfigError, match="bias_bits must be an integer in \\[8, 32\\] or None"):
        fxq.Target("t", bias_bits=bits)
