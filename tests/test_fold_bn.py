import pytest
import torch
from torch import nn

from fxq.errors import GraphCheckFailed
from fxq.frontend.trace import trace
from fxq.passes.fold_bn import FoldBN
from fxq.passes.normalize import Normalize
from fxq.pipeline import run_passes
from tests.conftest import randomize_bn_, seeded


def count(gm, cls):
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), cls))


@pytest.mark.parametrize("groups", [1, 4])
def test_fold_bn_keeps_outputs(groups):
    model = randomize_bn_(nn.Sequential(nn.Conv2d(8, 8, 3, groups=groups), nn.BatchNorm2d(8), nn.ReLU())).eval()
    x = seeded(2, 8, 10, 10)
    ref = model(x)
    gm = run_passes(trace(model), [FoldBN()])
    assert count(gm, nn.modules.batchnorm._BatchNorm) == 0
    torch.testing.assert_close(gm(x), ref, rtol=1e-5, atol=1e-5)


def test_fold_linear_bn1d():
    model = randomize_bn_(nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))).eval()
    x = seeded(3, 6)
    gm = run_passes(trace(model), [FoldBN()])
    assert count(gm, nn.BatchNorm1d) == 0
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_bn_with_two_users_is_left_alone():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # the conv output is needed unfolded too

    model = randomize_bn_(Shared()).eval()
    x = seeded(1, 3, 4, 4)
    gm = run_passes(trace(model), [FoldBN()])
    assert count(gm, nn.BatchNorm2d) == 1
    torch.testing.assert_close(gm(x), model(x))


def test_functional_bn_from_export_is_folded(tiny_net):
    x = seeded(2, 3, 16, 16)
    gm = run_passes(trace(tiny_net, (x,), frontend="export"), [Normalize(), FoldBN()])
    assert count(gm, nn.modules.batchnorm._BatchNorm) == 0
    torch.testing.assert_close(gm(x), tiny_net(x), rtol=1e-5, atol=1e-5)


def test_training_mode_bn_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).train()
    with pytest.raises(GraphCheckFailed, match=r"fold_bn: BatchNorm '1' is in training mode; call model.eval\(\)"):
        run_passes(trace(model), [FoldBN()])
