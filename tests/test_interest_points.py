import torch
import torch.nn.functional as F
from torch import nn

import fxq
from fxq.frontend.trace import trace
from fxq.ir.meta import q
from fxq.ir.taps import interest_nodes
from fxq.passes.annotate import Annotate
from fxq.passes.interest_points import InterestPoints
from fxq.passes.shapes import PropagateShapes
from fxq.pipeline import run_passes
from fxq.quant.modules import QuantWeight
from fxq.targets import INT8


def interest(model, *shape):
    gm = run_passes(trace(model), [PropagateShapes((torch.randn(*shape),)), Annotate(INT8), InterestPoints()])
    return [n.name for n in interest_nodes(gm)]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3, self.c4 = (nn.Conv2d(4, 4, 1) for _ in range(4))
        self.drop = nn.Dropout()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        a = F.relu(self.c1(x))  # followed by an activation: not Z
        b = self.c2(a)  # linear op feeding an add: Z
        c = b + x  # add: Z
        d = torch.relu(self.drop(self.c3(c)))  # activation behind a dropout: still "followed by": not Z
        e = torch.cat([d, self.c4(d)], 1)  # c4 feeds the cat: Z; the cat: Z
        return self.fc(e.mean((2, 3)))  # model output: the probe point, not Z


def test_interest_points_on_hand_built_graph():
    assert interest(Block().eval(), 2, 4, 5, 5) == ["c2", "add", "c4", "cat"]


def test_matmul_and_linear_outputs():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            s = torch.matmul(self.q(x), self.k(x).transpose(1, 2))  # q, k feed a matmul: Z; matmul -> softmax: Z
            return s.softmax(-1).sum(-1)

    assert interest(Attn().eval(), 2, 3, 4) == ["q", "k", "matmul"]


def test_output_behind_a_view_is_not_interest():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)

        def forward(self, x):
            return self.fc(x).view(-1, 2, 3)

    assert interest(Head().eval(), 2, 4) == []


def test_a_tensor_computed_from_parameters_alone_is_not_an_interest_tensor():
    class PositionBias(nn.Module):
        """Swin v2's continuous position bias: an MLP over a fixed table, the same for every image."""

        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.linspace(-1, 1, 8).reshape(4, 2))
            self.mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 4))
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            bias = self.mlp(self.table).mean(0)  # [4], no batch dimension
            return self.proj(x) + bias

    model = PositionBias().eval()
    gm = fxq.analyze(model, [torch.randn(3, 4)], fxq.PTQConfig(progress=False))
    names = {n.name for n in gm.graph.nodes if q(n).interest}
    assert names == {"proj"}  # the add is the output; the MLP's linear layers read no image
    qgm, _ = fxq.quantize(
        model,
        [torch.randn(8, 4)],
        fxq.PTQConfig(method="eptq", rounding=fxq.RoundingConfig(iterations=2, batch_size=4), progress=False),
    )
    assert sum(isinstance(m, QuantWeight) for m in qgm.modules()) == 3
