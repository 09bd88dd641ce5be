import pytest
import torch

import fxq
from fxq.frontend.dynamo import backend
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


def _codes_and_biases(qgm) -> list[tuple]:
    """Every quantized layer's integer codes, step and bias, in graph order."""
    from fxq.quant.modules import QuantWeight

    layers = [qgm.get_submodule(n.target) for n in qgm.graph.nodes if n.op == "call_module"]
    return [(m.hard_codes(), m.scale, m.layer.bias) for m in layers if isinstance(m, QuantWeight)]


@pytest.mark.parametrize(
    "config",
    [
        fxq.PTQConfig(target=fxq.INT8.with_bits(4), progress=False),
        fxq.PTQConfig(
            target=fxq.INT8.with_bits(4),
            method=fxq.Method.EPTQ,
            rounding=fxq.RoundingConfig(iterations=6, batch_size=4),
            lfh=fxq.LFHConfig(min_probes=2, max_probes=2, images=8, batch_size=8),
            progress=False,
        ),
        fxq.PTQConfig(
            mixed_precision=fxq.MixedPrecisionConfig(avg_bits=4.0, images=8, batch_size=8, check_images=8),
            lfh=fxq.LFHConfig(min_probes=2, max_probes=2, images=8, batch_size=8),
            progress=False,
        ),
    ],
    ids=["rtn", "eptq", "mixed-precision"],
)
def test_the_compile_backend_runs_every_stage_quantize_runs(tiny_net, config):
    """Same integer codes, steps and (int32-grid) biases as fxq.quantize, EPTQ and mixed precision included."""
    torch.manual_seed(0)
    ref, _ = fxq.quantize(tiny_net, _calib(), config)
    torch._dynamo.reset()
    torch.manual_seed(0)
    b = backend(_calib(), config, inductor=False)
    with torch.no_grad():
        torch.compile(tiny_net, backend=b, dynamic=False)(seeded(4, 3, 16, 16, seed=9))
    (qgm,) = b.graphs
    want, got = _codes_and_biases(ref), _codes_and_biases(qgm)
    assert len(got) == len(want) == 4
    for (c1, s1, b1), (c2, s2, b2) in zip(want, got):
        assert torch.equal(c1, c2) and torch.equal(s1, s2) and torch.equal(b1, b2)
