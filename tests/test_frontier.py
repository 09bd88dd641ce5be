"""The staged run of a graph over many batches (fxq.ir.frontier): the values at every stop against a plain run,
what it holds between stops, its half-precision storage, and its refusals."""

import pytest
import torch
from torch import fx, nn

import fxq.ir.frontier as frontier
from fxq.errors import ConfigError, GraphCheckFailed
from fxq.ir.frontier import Frontier
from tests.conftest import seeded


class Shared(nn.Module):
    """One conv called at two sites, a residual add across them, a size read off the batch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3, 2)

    def forward(self, x, scale: float = 2.0):
        y = torch.relu(self.conv(x))
        z = self.conv(y) * scale + x
        return self.head(z.mean((2, 3))).reshape(x.shape[0], -1)


def _plain_values(gm: fx.GraphModule, x: torch.Tensor) -> dict:
    run = fx.Interpreter(gm, garbage_collect_values=False)
    run.run(x)
    return dict(run.env)


def test_every_stop_holds_the_values_of_a_plain_run_and_only_those_read_later(monkeypatch):
    monkeypatch.setattr(frontier, "_HALF_MAX", -1.0)  # nothing halved: exact comparison
    gm = fx.symbolic_trace(Shared().eval())
    batches = [seeded(2, 3, 6, 6, seed=s) for s in range(3)]
    plain = [_plain_values(gm, x) for x in batches]
    run = Frontier(gm, batches, remedy="")
    nodes = list(gm.graph.nodes)
    for i, stop in enumerate(nodes[2:], 2):
        run.advance_to(stop)
        later = {a for n in nodes[i:] for a in n.all_input_nodes if nodes.index(a) < i}
        for k in range(len(batches)):
            assert set(run.held[k]) == later, stop.name
            for node, value in zip(later, run.values_of(k, list(later))):
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value, plain[k][node]), (stop.name, node.name)
                else:
                    assert value == plain[k][node]
    with pytest.raises(GraphCheckFailed, match="behind the current stop"):
        run.advance_to(nodes[3])


def test_values_are_held_in_half_precision_where_they_fit():
    gm = fx.symbolic_trace(Shared().eval())
    x = seeded(2, 3, 6, 6, seed=0)
    x[0, 0, 0, 0] = 1e5  # beyond float16: the input stays float32 bit for bit
    conv_sites = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "conv"]
    run = Frontier(gm, [x], remedy="")
    run.advance_to(conv_sites[1])
    relu = conv_sites[1].args[0]
    assert run.held[0][relu].dtype == torch.float16 and relu in run.halved[0]
    (got_x, got_relu) = run.values_of(0, [conv_sites[0].args[0], relu])
    assert torch.equal(got_x, x) and got_x.dtype == torch.float32
    expected = _plain_values(gm, x)[relu]
    assert got_relu.dtype == torch.float32
    torch.testing.assert_close(got_relu, expected, rtol=2**-10, atol=1e-6)


def test_a_stop_whose_values_would_not_fit_is_refused_with_the_remedy(monkeypatch):
    # 16 channels held at the second conv where the input had 3: the other batches would need ~4 kB more
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 3, 1)))
    monkeypatch.setattr(frontier, "available_bytes", lambda device: 1000)
    run = Frontier(gm, [seeded(2, 3, 6, 6, seed=s) for s in range(4)], remedy="use fewer images")
    with pytest.raises(ConfigError, match=r"at _2 for 4 batches take about .* (GiB|MiB|KiB|B) more.*use fewer images"):
        run.advance_to(list(gm.graph.nodes)[3])
    monkeypatch.setattr(frontier, "available_bytes", lambda device: 10**6)
    Frontier(gm, [seeded(2, 3, 6, 6, seed=s) for s in range(4)], remedy="").advance_to(list(gm.graph.nodes)[3])


def test_an_input_without_a_default_is_refused():
    class TwoInputs(nn.Module):
        def forward(self, x, y):
            return x + y

    gm = fx.symbolic_trace(TwoInputs())
    run = Frontier(gm, [seeded(2, 3, seed=0)], remedy="")
    with pytest.raises(GraphCheckFailed, match="'y' has no default"):
        run.advance_to(list(gm.graph.nodes)[-1])
