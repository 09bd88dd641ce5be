"""A layer called at several sites (one head applied to every level of a feature pyramid): each call its own
activation quantizers, one weight quantizer and one bias correction for all of them, under both front-ends."""

import pytest
import torch
from torch import nn

import fxq
from fxq.config import Method, MixedPrecisionConfig, PTQConfig, RoundingConfig
from fxq.frontend.trace import trace
from fxq.passes.fold_bn import FoldBN
from fxq.pipeline import run_passes
from fxq.quant.modules import ActQuant, QuantWeight
from tests.conftest import randomize_bn_, seeded, sqnr_db

CALIB = [seeded(4, 3, 16, 16, seed=i) for i in range(3)]


class TwoLevels(nn.Module):
    """A stem, a stride-2 conv, and one head applied to both levels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        a = torch.relu(self.stem(x))
        b = torch.relu(self.down(a))
        return self.head(a).mean((2, 3)) + 2 * self.head(b).mean((2, 3))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return TwoLevels().eval()


def _head_inputs_mean(model: TwoLevels) -> torch.Tensor:
    """The channel means of everything the head reads, over both sites and all calibration images."""
    seen = []
    hook = model.head.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        for x in CALIB:
            model(x)
    hook.remove()
    total = sum(t.sum((0, 2, 3)) for t in seen)
    return total / sum(t.numel() // t.shape[1] for t in seen)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_shared_layer_gets_one_weight_quantizer_and_one_bias_correction(frontend):
    model = _model()
    qgm, _ = fxq.quantize(model, CALIB, PTQConfig(frontend=frontend, progress=False))
    heads = [n for n in qgm.graph.nodes if n.op == "call_module" and "head" in n.target and "act" not in n.target]
    assert len(heads) == 2 and heads[0].target == heads[1].target  # both sites call one module
    qw = qgm.get_submodule(heads[0].target)
    assert isinstance(qw, QuantWeight)
    assert sum(isinstance(m, QuantWeight) for m in qgm.modules()) == 3  # stem, down, head
    assert len({n.args[0].target for n in heads}) == 2  # each site reads its own activation quantizer
    # the bias corrected once, with the inputs of both sites pooled (rounded codes, as RTN leaves them)
    w = model.head.weight.detach()
    w_q = qw.hard_codes() * qw.scale_like(w)
    mean = _head_inputs_mean(model)
    shift = ((w_q - w) * mean.view(1, -1, 1, 1)).sum((1, 2, 3))
    torch.testing.assert_close(qw.layer.bias.detach(), model.head.bias.detach() - shift, rtol=1e-4, atol=1e-4)
    x = seeded(4, 3, 16, 16, seed=9)
    assert sqnr_db(model(x), qgm(x)) > 20


def test_the_front_ends_agree_on_a_shared_layer():
    model, x = _model(), seeded(4, 3, 16, 16, seed=9)
    outs = [fxq.quantize(model, CALIB, PTQConfig(frontend=f, progress=False))[0](x) for f in ("fx", "export")]
    torch.testing.assert_close(outs[0], outs[1])


def test_eptq_rounds_a_shared_layer_once():
    model = _model()
    cfg = PTQConfig(
        target=fxq.INT8.with_bits(4),
        method=Method.EPTQ,
        rounding=RoundingConfig(iterations=4, batch_size=4, keep_best=False),
        lfh=fxq.LFHConfig(min_probes=2, max_probes=2, images=8, batch_size=8),
        progress=False,
    )
    qgm, report = fxq.quantize(model, CALIB, cfg)
    assert report.rounding["iterations"] == 4
    for m in qgm.modules():
        if isinstance(m, QuantWeight):  # on its grid: the one tensor both sites use
            w = m.layer.weight.detach()
            assert torch.equal(m.hard_codes() * m.scale_like(w), w)


def test_an_integer_export_of_a_shared_layer_computes_the_reference(tmp_path):
    pytest.importorskip("onnxruntime")
    model = _model()
    qgm, _ = fxq.quantize(model, CALIB, PTQConfig(progress=False))
    # the two sites read different activation grids: the one bias stays float (no int32 grid holds both)
    assert len({float(m.scale) for n, m in qgm.named_modules() if isinstance(m, ActQuant) and "relu" in n}) == 2
    check = fxq.export_onnx(qgm, (CALIB[0][:2],), str(tmp_path / "m.onnx"), check_inputs=torch.cat(CALIB))
    assert check.passed


def test_a_shared_layer_with_a_norm_at_each_site_is_not_folded():
    class PerSiteNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn_a(self.conv(x)) + self.bn_b(self.conv(2 * x))

    model, x = randomize_bn_(PerSiteNorm()).eval(), seeded(2, 3, 6, 6)
    gm = run_passes(trace(model), [FoldBN()])
    assert sum(isinstance(m, nn.BatchNorm2d) for m in gm.modules()) == 2
    torch.testing.assert_close(gm(x), model(x))


def test_mixed_precision_refuses_a_shared_layer_by_name():
    cfg = PTQConfig(mixed_precision=MixedPrecisionConfig(avg_bits=4), progress=False)
    with pytest.raises(fxq.UnsupportedOp, match="module 'head' is called at 2 sites"):
        fxq.quantize(_model(), CALIB, cfg)
