import torch
from torch import nn

import fxq
from fxq.ir.graph import float_graph
from fxq.ir.meta import OpKind, q
from fxq.passes.observe import Calibrate
from fxq.pipeline import prepare, run_passes
from fxq.quant.convert import is_calibrated
from fxq.quant.modules import ActObserver, ChannelStatsObserver
from tests.conftest import seeded


def _observers(gm, cls):
    return {
        q(n).observes.name: gm.get_submodule(n.target)
        for n in gm.graph.nodes
        if q(n).kind is OpKind.OBSERVER and isinstance(gm.get_submodule(n.target), cls)
    }


def test_observer_ranges_match_the_float_activations(tiny_net):
    xs = [seeded(3, 3, 12, 12, seed=s) for s in range(3)]
    gm = run_passes(prepare(tiny_net, (xs[0],)), [Calibrate(xs, progress=False)])
    obs = _observers(gm, ActObserver)
    # the stem's ReLU output, recomputed from the float model over the same batches
    stem = torch.cat([tiny_net.stem(x) for x in xs]).detach()
    relu_obs = obs["stem_2"]
    assert float(relu_obs.lo) == 0.0
    # the observed graph runs the conv with BN folded in, the float model conv then BN: two float32 kernels whose
    # results differ by the rounding of a 27-term dot product (~27 * 2^-24 relative); allow 1e-5
    assert abs(float(relu_obs.hi) - float(stem.max())) <= 1e-5 * float(stem.max())
    inp = obs["x"]
    assert (float(inp.lo), float(inp.hi)) == (float(torch.cat(xs).min()), float(torch.cat(xs).max()))
    assert relu_obs.sample().numel() == sum(min(4096, x.shape[0] * 8 * 144) for x in xs)


def test_float_graph_takes_the_observers_out_and_leaves_their_record_alone(tiny_net):
    xs = [seeded(3, 3, 12, 12, seed=s) for s in range(2)]
    gm = prepare(tiny_net, (xs[0],))
    assert not is_calibrated(gm)
    gm = run_passes(gm, [Calibrate(xs, progress=False)])
    assert is_calibrated(gm)
    relu = _observers(gm, ActObserver)["stem_2"]
    before = (relu.batches, float(relu.hi))
    plain = float_graph(gm)
    assert not any(q(n).kind is OpKind.OBSERVER for n in plain.graph.nodes) and not is_calibrated(plain)
    x = seeded(2, 3, 12, 12, seed=9) * 5  # beyond the calibrated range: an observer that saw it would widen
    with torch.no_grad():
        torch.testing.assert_close(plain(x), tiny_net(x), rtol=1e-5, atol=1e-5)
    assert (relu.batches, float(relu.hi)) == before
    assert len(list(plain.modules())) < len(list(gm.modules()))  # the observer modules went with their nodes


def test_channel_stats_observer_matches_input_statistics(tiny_net):
    xs = [seeded(2, 3, 12, 12, seed=s) for s in range(2)]
    gm = run_passes(prepare(tiny_net, (xs[0],)), [Calibrate(xs, progress=False)])
    stats = _observers(gm, ChannelStatsObserver)["stem_0"]
    x = torch.cat(xs)
    torch.testing.assert_close(stats.mean(), x.mean((0, 2, 3)))
    torch.testing.assert_close(stats.second_moment(), x.square().mean((0, 2, 3)))
    torch.testing.assert_close(stats.variance(), x.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-6)


def test_activation_signedness(tiny_net):
    qgm, report = fxq.quantize(tiny_net, [seeded(4, 3, 12, 12)], fxq.PTQConfig(progress=False))
    by_node = {lr.node: lr for lr in report.layers}
    assert by_node["stem_2"].act_signed is False  # after ReLU: unsigned
    assert by_node["x"].act_signed is True  # the normalised input has negatives
    assert by_node["stem_0"].act_bits is None  # conv fused with the ReLU that follows: one quantizer


def test_observer_passes_values_through():
    obs = ActObserver()
    x = seeded(2, 3, 4)
    assert obs(x) is x
    cm = ChannelStatsObserver(channel_dim=-1)
    assert cm(x) is x
    torch.testing.assert_close(cm.mean(), x.mean((0, 1)))


def test_calibration_nan_is_reported(tiny_net):
    x = seeded(2, 3, 12, 12)
    x[0, 0, 0, 0] = float("nan")
    import pytest

    with pytest.raises(fxq.GraphCheckFailed, match="NaN/inf"):
        fxq.quantize(tiny_net, [x], fxq.PTQConfig(progress=False))


def test_unreached_branch_is_reported():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)

        def forward(self, x):
            return self.a(x)

    gm = prepare(Unused().eval(), (seeded(2, 3),))
    import pytest

    with pytest.raises(fxq.GraphCheckFailed, match="calibration never reached"):
        fxq.convert(gm)
