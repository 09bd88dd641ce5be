"""Models no front-end traces whole (a detector's post-processing): the largest sub-modules that trace are
quantized on the inputs the float model gives them, and the rest runs float."""

import pytest
import torch
import torchvision
from torch import nn

import fxq
from fxq.config import Method, PTQConfig, RoundingConfig
from fxq.quant.modules import QuantWeight
from tests.conftest import seeded, sqnr_db

CALIB = [seeded(4, 3, 16, 16, seed=i) for i in range(3)]


class Head(nn.Module):
    """One conv applied to every feature map of a list (a detection head): its input is not one tensor."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.score = nn.Conv2d(8, 1, 1)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.score(torch.relu(self.conv(f))).flatten(1) for f in feats]


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = Head()

    def forward(self, x):
        a = self.backbone(x)
        scores = torch.cat(self.head([a, self.down(a)]), 1)
        keep = [s[s > s.median()] for s in scores]  # data-dependent sizes: neither front-end traces this
        if len(keep[0]) > 10:  # and Python branching on them
            keep = [k[:10] for k in keep]
        return scores, keep


def _model():
    torch.manual_seed(0)
    return Detector().eval()


def _head_scores(model, x):
    seen = []
    hook = model.head.register_forward_hook(lambda m, a, out: seen.append(torch.cat(out, 1)))
    with torch.no_grad():
        model(x)
    hook.remove()
    return seen[0]


def test_an_untraceable_model_is_quantized_part_by_part():
    model = _model()
    with pytest.raises(fxq.TraceFailed):
        fxq.quantize(model, CALIB, PTQConfig(frontend="fx", progress=False))  # a chosen front-end: no parts
    with pytest.warns(UserWarning, match=r"no front-end traced Detector whole .* quantized its parts"):
        qmodel, report = fxq.quantize(model, CALIB, PTQConfig(progress=False))
    assert report.frontend == "parts"
    assert set(report.settings["parts"]) == {"backbone", "down", "head"}
    assert report.settings["parts"]["head"]["frontend"] == "export"  # a list input: fx cannot iterate it
    assert sum(isinstance(m, QuantWeight) for m in qmodel.modules()) == 5  # every conv
    assert len({lr.module for lr in report.layers if lr.weight_bits is not None}) == 5  # (the head's: at 2 sites)
    x = seeded(4, 3, 16, 16, seed=7)
    ref, out = model(x), qmodel(x)
    assert out[0].shape == ref[0].shape and len(out[1]) == len(ref[1])  # the float post-processing still runs
    assert sqnr_db(_head_scores(model, x), _head_scores(qmodel, x)) > 25.0
    assert sqnr_db(ref[0], out[0]) > 25.0
    with pytest.raises(fxq.ModelError, match="part by part"):
        fxq.save(qmodel, "unused")


def test_parts_take_the_method_where_their_inputs_are_images():
    cfg = PTQConfig(method=Method.EPTQ, rounding=RoundingConfig(iterations=2, batch_size=4), progress=False)
    with pytest.warns(UserWarning, match="no front-end traced Detector whole"):
        _, report = fxq.quantize(_model(), CALIB, cfg)
    methods = {p: v["method"] for p, v in report.settings["parts"].items()}
    assert methods == {"backbone": "eptq", "down": "eptq", "head": "rtn"}  # the head's calls are lists


def test_no_part_traces_gives_the_trace_error():
    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            w = self.lin.weight
            return x @ w.T if x.sum() > 0 else x  # the layer is used without being called

    with pytest.raises(fxq.TraceFailed, match="neither front-end"):
        fxq.quantize(Opaque().eval(), [seeded(2, 4, seed=1)], PTQConfig(progress=False))


@pytest.mark.slow
def test_retinanet_keeps_returning_detections():
    torch.manual_seed(0)
    model = torchvision.models.get_model(
        "retinanet_resnet50_fpn", weights=None, weights_backbone=None, min_size=128, max_size=128
    ).eval()
    calib = [torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with pytest.warns(
        UserWarning, match=r"no front-end traced RetinaNet whole .*quantized its parts \['backbone', 'head'\]"
    ):
        qmodel, report = fxq.quantize(model, calib, PTQConfig(progress=False))
    assert set(report.settings["parts"]) == {"backbone", "head"}
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    assert sum(isinstance(m, QuantWeight) for m in qmodel.modules()) == n_layers
    out = qmodel(torch.rand(1, 3, 128, 128))
    assert isinstance(out, list) and set(out[0]) == {"boxes", "scores", "labels"}
