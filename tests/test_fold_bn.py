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


class NormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm2d subclass that asserts the input's rank and applies an activation
    (traced through, so the conv before it gets a second user that reads only its rank)."""

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected a 4-d input")
        x = nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )
        return torch.relu(x)


class LinearBN(nn.Module):
    """LeViT's Linear_BN: a BatchNorm1d over a linear layer's features, behind a flatten of the tokens."""

    def __init__(self):
        super().__init__()
        self.c, self.bn = nn.Linear(6, 5), nn.BatchNorm1d(5)

    def forward(self, x):
        y = self.c(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


@pytest.mark.parametrize(
    ("model", "x"),
    [
        (nn.Sequential(nn.Conv2d(3, 4, 3), NormAct(4)), seeded(2, 3, 8, 8)),
        (LinearBN(), seeded(2, 7, 6)),
    ],
    ids=["batchnorm-act", "linear-flatten-bn1d"],
)
def test_batchnorm_behind_a_rank_check_or_a_flatten_is_folded(model, x):
    from fxq.passes.shapes import PropagateShapes

    model = randomize_bn_(model).eval()
    gm = run_passes(trace(model), [Normalize(), PropagateShapes((x,)), FoldBN()])
    assert count(gm, nn.modules.batchnorm._BatchNorm) == 0
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_batchnorm_over_another_dim_than_the_features_is_left_alone():
    class Across(nn.Module):  # BatchNorm1d over the tokens, not the linear layer's features
        def __init__(self):
            super().__init__()
            self.c, self.bn = nn.Linear(6, 5), nn.BatchNorm1d(7)

        def forward(self, x):
            return self.bn(self.c(x))

    from fxq.passes.shapes import PropagateShapes

    model, x = randomize_bn_(Across()).eval(), seeded(2, 7, 6)
    gm = run_passes(trace(model), [Normalize(), PropagateShapes((x,)), FoldBN()])
    assert count(gm, nn.BatchNorm1d) == 1
    torch.testing.assert_close(gm(x), model(x))
