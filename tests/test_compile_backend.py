import pytest
import torch

import fxq
from fxq.compile_backend import backend
from tests.conftest import seeded


def _calib():
    return [seeded(8, 3, 16, 16, seed=i) for i in range(2)]


def _compiled(model, inductor):
    torch._dynamo.reset()
    return torch.compile(
        model, backend=backend(_calib(), fxq.PTQConfig(progress=False), inductor=inductor), dynamic=False
    )


def test_backend_quantizes_the_captured_graph_like_the_api(tiny_net):
    ref, _ = fxq.quantize(tiny_net, _calib(), fxq.PTQConfig(progress=False))
    x = seeded(4, 3, 16, 16, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(_compiled(tiny_net, inductor=False)(x), ref(x), rtol=0, atol=0)


def test_backend_hands_the_quantized_graph_to_inductor(tiny_net):
    ref, _ = fxq.quantize(tiny_net, _calib(), fxq.PTQConfig(progress=False))
    x = seeded(4, 3, 16, 16, seed=9)
    with torch.no_grad():
        out, r = _compiled(tiny_net, inductor=True)(x), ref(x)
    step = float(ref.get_submodule("fxq_act_head").scale)
    assert (out - r).abs().max() <= 2 * step  # Inductor's fused x * (1/s) may round a tie the other way
    assert (out.argmax(1) == r.argmax(1)).float().mean() >= 0.75


def test_graph_breaks_are_refused_with_the_remedy():
    class Breaks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            y = self.a(x)
            torch._dynamo.graph_break()
            return torch.relu(self.b(y)) + 1  # a graph of other ops than the first

    torch._dynamo.reset()
    cm = torch.compile(Breaks().eval(), backend=backend([seeded(2, 4)], fxq.PTQConfig(progress=False), inductor=False))
    with pytest.raises(Exception, match="fxq calibrates graphs whose one input is the model input|Remove graph breaks"):
        cm(seeded(2, 4))
