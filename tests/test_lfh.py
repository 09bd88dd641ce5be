import pytest
import torch
from torch import nn
from torch.fx import Interpreter
from torch.utils._pytree import tree_leaves

import fxq
from fxq.eptq.lfh import log_normalize
from fxq.ir.meta import gq, q
from fxq.ir.taps import interest_nodes
from fxq.kernels.lfh_reduce import RunningStats, sumsq_per_sample, welford_update_
from fxq.passes.lfh import LFH
from tests.conftest import TinyNet, randomize_bn_, seeded


class MLP(nn.Module):
    """z1 = lin1(x) and zs = lin_skip(x) feed an add (all three are interest tensors); the head is the output."""

    def __init__(self):
        super().__init__()
        self.lin1, self.lin_skip, self.head = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.lin1(x) + self.lin_skip(x)))


def exact_traces(gm, x) -> dict[str, float]:
    """E_x ||J_z f(x)||_F^2 exactly: one backward per output coordinate (one-hot probes)."""
    z_nodes = interest_nodes(gm)
    captured = {}

    class Capture(Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in z_nodes:
                captured[n.name] = out
            return out

    xr = x.clone().requires_grad_(True)
    out = torch.cat([t.flatten(1) for t in tree_leaves(Capture(gm).run(xr))], 1)  # several outputs: all of them
    total = {name: torch.zeros(x.shape[0]) for name in captured}
    for c in range(out.shape[1]):
        grads = torch.autograd.grad(out[:, c].sum(), list(captured.values()), retain_graph=True)
        for name, g in zip(captured, grads):
            total[name] += g.reshape(g.shape[0], -1).square().sum(1)
    return {name: float(t.mean()) for name, t in total.items()}


def lfh_of(model, x, **cfg):
    gm, report = fxq.label_free_hessian(
        model, [x], fxq.LFHConfig(images=x.shape[0], **cfg), fxq.PTQConfig(progress=False)
    )
    return gm, {lr.node: lr for lr in report.layers if lr.interest}


def test_one_hot_oracle_equals_jacrev():
    torch.manual_seed(0)
    model = MLP().eval()
    x = seeded(5, 6)
    gm, _ = lfh_of(model, x, min_probes=1, max_probes=1)
    oracle = exact_traces(gm, x)
    # d head(tanh(a)) / d a, per sample, from torch.func.jacrev, for the add output a
    a = (model.lin1(x) + model.lin_skip(x)).detach()
    jac = torch.vmap(torch.func.jacrev(lambda ai: model.head(torch.tanh(ai))))(a)  # (B, 4, 8)
    assert oracle["add"] == pytest.approx(float(jac.detach().square().sum((1, 2)).mean()), rel=1e-5)


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
@pytest.mark.parametrize("make", [MLP, TinyNet], ids=["mlp", "cnn_add_cat"])
def test_hutchinson_matches_exact_within_three_standard_errors(make, probe):
    torch.manual_seed(0)
    model = randomize_bn_(make()).eval()
    x = seeded(6, 6) if make is MLP else seeded(6, 3, 12, 12)
    gm, est = lfh_of(model, x, min_probes=400, max_probes=400, probe=probe, seed=1)
    exact = exact_traces(gm, x)
    assert set(est) == set(exact) and len(exact) >= 3
    for name, t in exact.items():
        assert abs(est[name].lfh - t) <= 3 * est[name].lfh_stderr, (name, est[name].lfh, t, est[name].lfh_stderr)
        assert est[name].lfh == pytest.approx(t, rel=0.15)


class TwoHeads(MLP):
    """Two outputs in a dict (a segmentation model's 'out' and 'aux', a detector's heads)."""

    def __init__(self):
        super().__init__()
        self.head2 = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.lin1(x) + self.lin_skip(x))
        return {"out": self.head(h), "aux": self.head2(h)}


def test_a_dict_of_outputs_is_probed_as_one_output():
    torch.manual_seed(0)
    model = TwoHeads().eval()
    x = seeded(6, 6)
    gm, est = lfh_of(model, x, min_probes=400, max_probes=400, seed=1)
    exact = exact_traces(gm, x)
    assert set(est) == set(exact) and len(exact) >= 3
    for name, t in exact.items():
        assert abs(est[name].lfh - t) <= 3 * est[name].lfh_stderr, (name, est[name].lfh, t, est[name].lfh_stderr)


def test_probe_batching_gives_the_same_estimator(tiny_net):
    x = seeded(4, 3, 12, 12)
    _, one = lfh_of(tiny_net, x, min_probes=300, max_probes=300, probes_per_pass=1)
    _, many = lfh_of(tiny_net, x, min_probes=300, max_probes=300, probes_per_pass=10)
    for name in one:
        se = (one[name].lfh_stderr ** 2 + many[name].lfh_stderr ** 2) ** 0.5
        assert abs(one[name].lfh - many[name].lfh) <= 4 * se


def test_log_normalisation():
    lam = log_normalize(torch.tensor([1e-3, 1.0, 10.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(lam, torch.tensor([0.0, 3.0, 4.0, 0.0], dtype=torch.float64))


def test_adaptive_stopping(tiny_net):
    x = seeded(4, 3, 12, 12)
    gm, _ = lfh_of(tiny_net, x, min_probes=3, max_probes=50, rel_tol=10.0)  # any move is "small": stop at min
    assert gq(gm).lfh_probes == [3]
    gm, _ = lfh_of(tiny_net, x, min_probes=3, max_probes=7, rel_tol=1e-12)  # never settles: stop at max
    assert gq(gm).lfh_probes == [7]


def test_welford_reference_matches_batch_statistics():
    vals = seeded(3, 40).abs() * 5
    stats = RunningStats.zeros(3)
    for chunk in vals.split([7, 1, 20, 12], dim=1):
        welford_update_(stats, chunk)
    torch.testing.assert_close(stats.mean, vals.double().mean(1))
    torch.testing.assert_close(stats.variance(), vals.double().var(1))
    assert stats.count.tolist() == [40.0] * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sumsq_per_sample(dtype):
    g = seeded(3, 4, 5).to(dtype)
    torch.testing.assert_close(sumsq_per_sample(g), g.float().square().sum((1, 2)))


def test_lfh_refuses_a_quantized_graph(tiny_net):
    qgm, _ = fxq.quantize(tiny_net, [seeded(2, 3, 12, 12)], fxq.PTQConfig(progress=False))
    with pytest.raises(fxq.GraphCheckFailed, match="run LFH on the float graph"):
        fxq.pipeline.run_passes(qgm, [LFH([seeded(2, 3, 12, 12)])])


def test_bad_lfh_config():
    with pytest.raises(fxq.ConfigError, match="need 0 < min_probes <= max_probes, got 10, 5"):
        fxq.LFHConfig(min_probes=10, max_probes=5)
    with pytest.raises(fxq.ConfigError, match="probe must be one of"):
        fxq.LFHConfig(probe="uniform")


def test_traces_and_weights_land_on_the_graph(tiny_net):
    gm, est = lfh_of(tiny_net, seeded(4, 3, 12, 12), min_probes=5, max_probes=5)
    for node in interest_nodes(gm):
        assert q(node).lfh > 0 and q(node).lfh_weight >= 0
    assert min(lr.lfh_weight for lr in est.values()) == 0.0
