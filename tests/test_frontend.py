import pytest
import torch
from torch import nn

import fxq
from fxq.frontend.trace import trace
from fxq.ir.meta import gq
from tests.conftest import seeded


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value: symbolic_trace cannot follow it
            return x * 2
        return x


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Conv2d(3, 3, 1)
        self.gate = DataDependent()

    def forward(self, x):
        return self.gate(self.pre(x))


def test_untraceable_model_names_module_line_and_remedies():
    with pytest.raises(fxq.TraceFailed) as err:
        trace(Outer().eval())
    msg = str(err.value)
    assert "module 'gate' (DataDependent)" in msg
    assert "test_frontend.py:" in msg and "if x.sum() > 0" in msg
    assert "frontend='export'" in msg and "leaf_modules=('gate',)" in msg


def test_a_failure_at_the_root_suggests_no_leaf_that_would_quantize_nothing():
    with pytest.raises(fxq.TraceFailed) as err:
        trace(DataDependent().eval())
    msg = str(err.value)
    assert "module '<root>'" in msg and "if x.sum() > 0" in msg
    assert "leaf_modules" not in msg and "frontend='export'" in msg


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_trace_errors_name_the_models_own_line_in_a_torch_named_package(frontend):
    # torchvision lives beside torch ('.../torchvision' starts with '.../torch'): its lines are the model's, and
    # neither fxq's tracer nor torch's generated code ('<string>') is named instead
    import torchvision

    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None)
    with pytest.raises(fxq.TraceFailed) as err:
        trace(model.eval(), (seeded(1, 3, 64, 64),), frontend=frontend)
    msg = str(err.value)
    assert "/torchvision/" in msg and "fxq/" not in msg and "<string>" not in msg, msg
    assert len(msg) < 1000  # not a symbolic graph


def test_leaf_module_makes_it_traceable():
    model = Outer().eval()
    gm = trace(model, leaf_modules=("gate",))
    assert any(n.op == "call_module" and n.target == "gate" for n in gm.graph.nodes)
    for seed in (0, 1):  # both branches of the data-dependent gate
        x = seeded(1, 3, 4, 4, seed=seed)
        torch.testing.assert_close(gm(x), model(x))


def test_export_needs_example_inputs():
    with pytest.raises(fxq.TraceFailed, match="needs example inputs"):
        trace(nn.Linear(2, 2), frontend="export")


def test_not_a_module():
    with pytest.raises(fxq.TraceFailed, match="expected an nn.Module, got function"):
        trace(lambda x: x)


def test_export_keeps_a_dynamic_batch(tiny_net):
    gm = trace(tiny_net, (seeded(2, 3, 8, 8),), frontend="export")
    x = seeded(5, 3, 8, 8)
    torch.testing.assert_close(gm(x), tiny_net(x))


def test_quantize_passes_leaf_modules_through():
    model = Outer().eval()
    qgm, report = fxq.quantize(model, [seeded(2, 3, 4, 4)], fxq.PTQConfig(leaf_modules=("gate",), progress=False))
    assert [lr.node for lr in report.layers if lr.weight_bits] == ["pre"]


class ShapeTest(nn.Module):
    """A shape test in Python (timm's MobileViT: `if new_h != H`): symbolic tracing fails, export follows it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if y.shape[-1] % 2:
            y = nn.functional.pad(y, (0, 1))
        return y.mean((2, 3))


def test_auto_traces_with_export_where_symbolic_tracing_fails():
    model = ShapeTest().eval()
    x = seeded(2, 3, 8, 8)
    with pytest.raises(fxq.TraceFailed):
        trace(model, (x,), frontend="fx")
    gm = trace(model, (x,), frontend="auto")
    assert gq(gm).frontend == "export"
    torch.testing.assert_close(gm(x), model(x))
    qgm, report = fxq.quantize(model, [x], fxq.PTQConfig(progress=False))  # auto is the default
    assert report.frontend == "export"


def test_auto_names_both_failures_and_suggests_only_what_would_work():
    with pytest.raises(fxq.TraceFailed) as err:
        trace(Outer().eval(), (seeded(2, 3, 4, 4),), frontend="auto")  # export cannot branch on a value either
    msg = str(err.value)
    assert msg.startswith("neither front-end traced the model: symbolic_trace failed in module 'gate'")
    assert "torch.export failed at" in msg and "leaf_modules=('gate',)" in msg
    assert "frontend='export'" not in msg and "frontend='fx'" not in msg
