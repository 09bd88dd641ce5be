import pytest
import torch
from torch import nn

import fxq
from fxq.ir.meta import OpKind
from fxq.quant.modules import ActQuant, QuantWeight
from fxq.targets import INT8
from tests.conftest import seeded, sqnr_db


def _calib(n=4, seed=0):
    return [seeded(8, 3, 16, 16, seed=seed + i) for i in range(n)]


def test_w8a8_is_close_to_float(tiny_net):
    qgm, report = fxq.quantize(tiny_net, _calib(), fxq.PTQConfig(progress=False))
    x = seeded(8, 3, 16, 16, seed=99)
    assert sqnr_db(tiny_net(x), qgm(x)) > 30  # 8-bit everything: ~6 dB per bit minus accumulation
    kinds = [type(m) for m in qgm.modules()]
    assert kinds.count(QuantWeight) == 4  # stem conv, conv_a, branch, head: first and last included
    assert not any(isinstance(m, nn.BatchNorm2d) for m in qgm.modules())
    assert report.calib_images == 32


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weights_lie_on_their_integer_grid(tiny_net, bits):
    qgm, report = fxq.quantize(tiny_net, _calib(2), fxq.PTQConfig(target=INT8.with_bits(bits), progress=False))
    for m in qgm.modules():
        if isinstance(m, QuantWeight):
            codes = m.quantized_weight() / m.scale.view(-1, *[1] * (m.layer.weight.dim() - 1))
            torch.testing.assert_close(codes, codes.round(), atol=1e-3, rtol=0)
            assert codes.min() >= -(2 ** (bits - 1)) - 1e-3 and codes.max() <= 2 ** (bits - 1) - 1 + 1e-3
    assert {lr.weight_bits for lr in report.layers if lr.weight_bits} == {bits}


def test_lower_bits_lose_more(tiny_net):
    x = seeded(8, 3, 16, 16, seed=99)
    sq = {
        b: sqnr_db(
            tiny_net(x),
            fxq.quantize(tiny_net, _calib(), fxq.PTQConfig(target=INT8.with_bits(b), progress=False)).model(x),
        )
        for b in (2, 4, 8)
    }
    assert sq[8] > sq[4] > sq[2]


def test_bias_correction_removes_the_mean_shift():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(4, 8, 3)).eval()
    data = [seeded(16, 4, 10, 10, seed=i) + torch.arange(4.0).view(1, 4, 1, 1) for i in range(2)]  # nonzero means
    x = torch.cat(data)
    ref = conv(x).detach().mean((0, 2, 3))
    shift = {}
    for bc in (False, True):
        qgm, _ = fxq.quantize(conv, data, fxq.PTQConfig(target=INT8.with_bits(2), bias_correction=bc, progress=False))
        shift[bc] = (qgm(x).detach().mean((0, 2, 3)) - ref).abs().mean()
    assert shift[True] < 0.25 * shift[False]


def test_model_is_not_changed(tiny_net):
    before = {k: v.clone() for k, v in tiny_net.state_dict().items()}
    fxq.quantize(tiny_net, _calib(1), fxq.PTQConfig(progress=False))
    for k, v in tiny_net.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_every_quantizer_is_in_the_report(tiny_net):
    qgm, report = fxq.quantize(tiny_net, _calib(1), fxq.PTQConfig(progress=False))
    n_act = sum(isinstance(m, ActQuant) for m in qgm.modules())
    assert sum(lr.act_bits is not None for lr in report.layers) == n_act
    assert [lr.node for lr in report.layers if lr.interest] == ["conv_a", "add", "branch", "cat"]
    assert "Calibrate" in report.stage_seconds and "Quantize" in report.stage_seconds
    d = report.to_dict()
    assert d["layers"][0]["node"] == "x"
    assert "node" in report.table().splitlines()[0]


def test_prepare_convert_split_equals_quantize(tiny_net):
    data = _calib(2)
    gm = fxq.prepare(tiny_net, (data[0],))
    with torch.no_grad():
        for x in data:
            gm(x)
    split = fxq.convert(gm)
    whole, _ = fxq.quantize(tiny_net, data, fxq.PTQConfig(progress=False))
    x = seeded(4, 3, 16, 16, seed=5)
    torch.testing.assert_close(split(x), whole(x), rtol=0, atol=0)


def test_empty_calibration_data(tiny_net):
    with pytest.raises(fxq.DataError, match="calibration data is empty"):
        fxq.quantize(tiny_net, [], fxq.PTQConfig(progress=False))


def test_bad_config_values():
    with pytest.raises(fxq.ConfigError, match="method must be one of"):
        fxq.PTQConfig(method="adaround-ish")
    with pytest.raises(fxq.ConfigError, match=r"weight_bits must be integers in \[2, 8\], got 9"):
        INT8.with_bits(9)
    with pytest.raises(fxq.ConfigError, match=r"act_bits must be integers in \[2, 8\], got 1"):
        INT8.with_bits(4, 1)


def test_frontends_agree(tiny_net):
    data = _calib(2)
    x = seeded(4, 3, 16, 16, seed=5)
    fx_q, fx_rep = fxq.quantize(tiny_net, data, fxq.PTQConfig(progress=False, frontend="fx"))
    ex_q, ex_rep = fxq.quantize(tiny_net, data, fxq.PTQConfig(progress=False, frontend="export"))
    assert sum(lr.weight_bits is not None for lr in ex_rep.layers) == sum(
        lr.weight_bits is not None for lr in fx_rep.layers
    )
    assert sum(lr.interest for lr in ex_rep.layers) == sum(lr.interest for lr in fx_rep.layers)
    assert sqnr_db(fx_q(x), ex_q(x)) > 30


def test_quantized_model_kinds_are_kept(tiny_net):
    qgm, _ = fxq.quantize(tiny_net, _calib(1), fxq.PTQConfig(progress=False))
    from fxq.ir.ops import kind_of

    kinds = {n.name: kind_of(qgm, n) for n in qgm.graph.nodes}
    assert kinds["head"] is OpKind.LINEAR and kinds["stem_0"] is OpKind.CONV


def test_mha_is_exposed_for_quantization():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    x = seeded(2, 5, 8)
    gm = fxq.trace(M().eval())
    torch.testing.assert_close(gm(x), M()(x), rtol=1e-5, atol=1e-5)  # same numbers as nn.MultiheadAttention
    qgm, report = fxq.quantize(M().eval(), [x], fxq.PTQConfig(progress=False))
    assert sum(lr.weight_bits is not None for lr in report.layers) == 4  # q, k, v and out projections
