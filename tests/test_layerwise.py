"""Layer-local rounding: the input moments against the layer's own output error, the error-feedback choice
against a plain column-by-column reference, the float target against least squares, the choices made in graph
order, and the rounding optimization started from them."""

import pytest
import torch
from torch import nn

import fxq
import fxq.eptq.layerwise as layerwise
import fxq.ir.frontier as frontier
from fxq.config import LFHConfig, Method, PTQConfig, RoundingConfig
from fxq.eptq.layerwise import Moments, float_target, layerwise_choice
from fxq.eptq.soft_rounding import SoftRounding, rectified_sigmoid, rounding_penalty
from fxq.errors import ConfigError
from fxq.ir.graph import nodes_by_name
from fxq.ir.taps import with_taps
from fxq.quant.modules import QuantWeight, layer_forward
from fxq.targets import INT8
from tests.conftest import seeded
from tests.test_rounding import _eptq, _quant_layers, rounding_train
from tests.test_soft_rounding import _quant

LAYERS = {
    "linear": (lambda: nn.Linear(12, 5), (6, 3, 12)),
    "conv3x3 stride 2": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (3, 4, 11, 9)),
    "depthwise 5x5": (lambda: nn.Conv2d(6, 6, 5, padding=2, groups=6), (3, 6, 8, 8)),
    "grouped same": (lambda: nn.Conv2d(6, 4, 3, padding="same", groups=2), (3, 6, 7, 7)),
    "pointwise": (lambda: nn.Conv2d(5, 7, 1), (3, 5, 6, 6)),
    "dilated": (lambda: nn.Conv2d(3, 4, 3, padding=2, dilation=2), (2, 3, 9, 9)),
}


def _floor(qw: QuantWeight) -> torch.Tensor:
    """floor(w/s) clamped to the grid (the lower of the two codes a choice picks between), computed here."""
    w = qw.layer.weight.detach()
    return torch.floor(w / qw.scale_like(w)).clamp(qw.spec.qmin, qw.spec.qmax)


def _sums(qw: QuantWeight, x: torch.Tensor, f: torch.Tensor | None = None) -> Moments:
    """The moments of quantized inputs x (and float inputs f, x itself by default), two images at a time."""
    moments = Moments(qw.layer)
    for xb, fb in zip(x.split(2), (x if f is None else f).split(2)):
        moments.add_(qw.layer, xb, fb)
    return moments


def _moments(qw: QuantWeight, x: torch.Tensor, centred: bool, weights: torch.Tensor | None = None) -> torch.Tensor:
    """H of inputs x, two images at a time, each output position weighted by `weights` where given."""
    if weights is None:
        return _sums(qw, x).hessian(centred)
    moments = Moments(qw.layer)
    for xb, wb in zip(x.split(2), weights.split(2)):
        moments.add_(qw.layer, xb, xb, wb)
    return moments.hessian(centred)


def _position_shape(qw: QuantWeight, x: torch.Tensor) -> tuple[int, ...]:
    """The layer output's shape without its channels."""
    y = layer_forward(qw.layer, x, qw.layer.weight, None)
    return tuple(y.shape[:-1]) if isinstance(qw.layer, nn.Linear) else (y.shape[0], *y.shape[2:])


def _output_error(qw: QuantWeight, h: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
    """sum over output channels of dw_r H dw_r^T, each row against its group's H."""
    groups = h.shape[0]
    rows = dw.reshape(groups, dw.shape[0] // groups, -1)
    return torch.einsum("gri,gij,grj->", rows.double(), h.double(), rows.double())


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("centred", [False, True])
@pytest.mark.parametrize("weighted", [False, True], ids=["positions alike", "positions weighted"])
def test_input_moments_give_the_mean_squared_output_of_a_weight_change(kind, centred, weighted, monkeypatch):
    # every output position counted (no subsampling): dw H dw^T equals the mean over positions of the layer's
    # output for weight dw, squared (its variance per channel when centred), whatever the layout; with position
    # weights, the weighted mean (about the weighted mean when centred)
    monkeypatch.setattr(layerwise, "POSITIONS", 10**9)
    make, shape = LAYERS[kind]
    torch.manual_seed(0)
    qw = _quant(make())
    x = seeded(*shape, seed=1) + 0.5
    w = torch.rand(_position_shape(qw, x), generator=torch.Generator().manual_seed(5)) * 3 if weighted else None
    h = _moments(qw, x, centred, w)
    dw = seeded(*qw.layer.weight.shape, seed=2)
    y = layer_forward(qw.layer, x, dw, None)
    y = y.movedim(1, -1) if isinstance(qw.layer, nn.Conv2d) else y  # output channels last
    y = y.reshape(-1, y.shape[-1]).double()
    p = torch.ones(len(y), dtype=y.dtype) if w is None else w.reshape(-1).double()
    if centred:
        y = y - (p[:, None] * y).sum(0) / p.sum()
    expected = (p * y.pow(2).sum(1)).sum() / p.sum()
    torch.testing.assert_close(_output_error(qw, h, dw), expected, rtol=1e-4, atol=0)


@pytest.mark.parametrize(
    "make, size",
    [
        (lambda: nn.Conv2d(3, 4, 3, padding=1), (6, 6)),
        (lambda: nn.Conv2d(3, 3, 5, stride=2, padding=2, groups=3), (11, 12)),  # the kept rows read padding
        (lambda: nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(0, 1)), (13, 5)),
    ],
)
@pytest.mark.parametrize("weighted", [False, True], ids=["positions alike", "positions weighted"])
def test_subsampled_moments_are_those_of_evenly_spaced_output_rows(make, size, weighted, monkeypatch):
    monkeypatch.setattr(layerwise, "POSITIONS", 12)  # 6 x 6 outputs per image: every third row
    qw = _quant(make())
    x = seeded(4, 3, *size, seed=3).contiguous(memory_format=torch.channels_last)
    w = torch.rand(_position_shape(qw, x), generator=torch.Generator().manual_seed(6)) + 0.1 if weighted else None
    h = _moments(qw, x, centred=False, weights=w)
    dw = seeded(*qw.layer.weight.shape, seed=4)
    y = layer_forward(qw.layer, x, dw, None)[:, :, ::3]
    p = torch.ones(y[:, 0].shape) if w is None else w[:, ::3]  # the weights of the kept rows
    expected = (p.double() * y.double().pow(2).sum(1)).sum() / p.sum()
    torch.testing.assert_close(_output_error(qw, h, dw), expected, rtol=1e-4, atol=0)


def _reference_choice(qw: QuantWeight, h: torch.Tensor) -> torch.Tensor:
    """Optimal Brain Quantization's update written plainly for one dense layer, in float64, columns in order of
    decreasing H diagonal: round a column within floor/floor+1, move its error onto the rest through H^-1, drop
    the column from H^-1."""
    w = qw.layer.weight.detach().double().reshape(qw.layer.weight.shape[0], -1)
    s = qw.scale.double().reshape(-1, 1)
    floor = torch.floor(w / s)
    lo, hi = floor.clamp(qw.spec.qmin, qw.spec.qmax), (floor + 1).clamp(qw.spec.qmin, qw.spec.qmax)
    h = h[0].double().clone()
    h.diagonal().add_(layerwise.DAMPING * h.diagonal().mean())
    order = torch.argsort(h.diagonal(), descending=True)
    w, lo, hi, h = w[:, order].clone(), lo[:, order], hi[:, order], h[order][:, order]
    inv = torch.linalg.inv(h)
    codes = torch.empty_like(w)
    for j in range(w.shape[1]):
        codes[:, j] = torch.minimum(torch.maximum(torch.round(w[:, j] / s[:, 0]), lo[:, j]), hi[:, j])
        err = (w[:, j] - codes[:, j] * s[:, 0]) / inv[j, j]
        w[:, j:] -= err[:, None] * inv[j, j:][None]
        inv = inv - inv[:, j : j + 1] @ inv[j : j + 1, :] / inv[j, j]
    back = torch.empty_like(codes)
    back[:, order] = codes
    return (back > torch.floor(qw.layer.weight.detach().double().reshape(w.shape) / s).clamp(qw.spec.qmin, None)).to(
        torch.float32
    )


def _correlated_inputs(n: int, features: int, seed: int) -> torch.Tensor:
    """Inputs with strongly correlated features (as a layer's inputs are), one feature never active."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) + 2 * torch.eye(features)
    x = torch.randn(n, features, generator=g) @ mix
    x[:, 3] = 0
    return x


def test_the_choice_matches_the_plain_column_by_column_update():
    # 300 columns: more than one block of lazy updates, a dead input among them
    torch.manual_seed(0)
    qw = _quant(nn.Linear(300, 16), bits=3)
    h = _moments(qw, _correlated_inputs(2000, 300, seed=5), centred=False)
    ours, ref = layerwise_choice(qw, h), _reference_choice(qw, h)
    agree = (ours == ref).float().mean()
    assert agree > 0.995, agree  # float32 against float64: a few near-ties may go either way
    w = qw.layer.weight.detach()
    floor = _floor(qw)
    err = [_output_error(qw, h, (floor + c) * qw.scale_like(w) - w) for c in (ours, ref)]
    assert err[0] == pytest.approx(float(err[1]), rel=1e-3)


def test_uncorrelated_inputs_give_round_to_nearest():
    # a diagonal H passes no error between columns: each weight rounds to its nearest grid point
    torch.manual_seed(0)
    qw = _quant(nn.Conv2d(4, 6, 3), bits=3)
    h = torch.diag(torch.rand(36) + 0.5)[None]
    choice = layerwise_choice(qw, h)
    rtn = qw.hard_codes() - _floor(qw)
    assert torch.equal(choice, rtn)


@pytest.mark.parametrize("kind", ["linear", "conv3x3 stride 2", "depthwise 5x5", "grouped same"])
def test_the_choice_has_a_lower_output_error_than_round_to_nearest(kind):
    make, shape = LAYERS[kind]
    torch.manual_seed(0)
    qw = _quant(make(), bits=3)
    if len(shape) == 4:  # smooth images: neighbouring pixels correlated, as in real feature maps
        x = torch.nn.functional.avg_pool2d(seeded(shape[0], shape[1], shape[2] + 4, shape[3] + 4, seed=6), 5, 1)
    else:
        x = _correlated_inputs(200, shape[-1], seed=6)
    h = _moments(qw, x, centred=False)
    w = qw.layer.weight.detach()
    floor = _floor(qw)
    ours = _output_error(qw, h, (floor + layerwise_choice(qw, h)) * qw.scale_like(w) - w)
    rtn = _output_error(qw, h, qw.hard_codes() * qw.scale_like(w) - w)
    assert ours < 0.8 * rtn, (float(ours), float(rtn))


def test_coordinate_descent_ends_where_no_single_weight_s_move_lowers_its_row_s_error():
    # 3-bit depthwise 3 x 3 on smooth images: 9 weights a row, so every move from the result can be tried
    torch.manual_seed(0)
    qw = _quant(nn.Conv2d(16, 16, 3, padding=1, groups=16), bits=3)
    x = torch.nn.functional.avg_pool2d(seeded(8, 16, 20, 20, seed=8), 5, 1)
    h = _moments(qw, x, centred=False)
    damped = layerwise._damped(h)  # the objective the choice minimises
    w = qw.layer.weight.detach().double().reshape(16, 9)
    s, floor = qw.scale.double().reshape(16, 1), _floor(qw).double().reshape(16, 9)
    free = qw.rounding_bounds()[1].double().reshape(16, 9)

    def errors(choice):  # each channel's (w - w_q) H (w - w_q)^T
        e = w - (floor + choice.double().reshape(16, 9)) * s
        return torch.einsum("gi,gij,gj->g", e, damped, e)

    plain, swept = layerwise_choice(qw, h), layerwise_choice(qw, h, sweeps=20)
    assert bool((errors(swept) <= errors(plain) * (1 + 1e-5)).all())
    assert float(errors(swept).sum()) < 0.99 * float(errors(plain).sum())  # it moved something that mattered
    base = errors(swept)
    for j in range(9):
        moved = swept.reshape(16, 9).clone()
        moved[:, j] = torch.where(free[:, j] > 0, 1 - moved[:, j], moved[:, j])
        assert bool((errors(moved) >= base * (1 - 1e-5)).all()), j


def test_a_depthwise_choice_is_each_channel_s_own():
    torch.manual_seed(0)
    dw = _quant(nn.Conv2d(3, 3, 3, padding=1, groups=3))
    x = torch.nn.functional.avg_pool2d(seeded(4, 3, 12, 12, seed=7), 3, 1)
    together = layerwise_choice(dw, _moments(dw, x, centred=True))
    for c in range(3):
        one = _quant(nn.Conv2d(1, 1, 3, padding=1))
        with torch.no_grad():
            one.layer.weight.copy_(dw.layer.weight[c : c + 1])
            one.scale.copy_(dw.scale[c : c + 1])
        assert torch.equal(layerwise_choice(one, _moments(one, x[:, c : c + 1], centred=True)), together[c : c + 1])


def _float_and_quantized(n: int, features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float inputs f with an offset, and quantized inputs x that carry an error correlated with f (a shrunk copy
    plus noise, as clipping and rounding upstream leave it)."""
    f = _correlated_inputs(n, features, seed) + 0.7
    return f, 0.9 * f + 0.3 * seeded(n, features, seed=seed + 1)


@pytest.mark.parametrize("centred", [False, True])
def test_the_float_target_is_the_least_squares_fit_of_the_float_output(centred, monkeypatch):
    # undamped, W E[f x^T] E[x x^T]^-1 is the T that minimises ||W f - T x||^2 over the inputs (each about its
    # own mean when centred)
    monkeypatch.setattr(layerwise, "DAMPING", 0.0)
    torch.manual_seed(0)
    qw = _quant(nn.Linear(10, 4))
    f, x = _float_and_quantized(500, 10, seed=3)
    f[:, 3] = x[:, 3] = 1.0  # a constant input: a dead column once centred, which the solve must get past
    sums = _sums(qw, x, f)
    target = float_target(qw, sums.hessian(centred), sums.cross(centred))
    if centred:
        f, x = f - f.mean(0), x - x.mean(0)
    w = qw.layer.weight.detach().double()
    fit = torch.linalg.lstsq(x.double(), f.double() @ w.T).solution.T
    keep = [c for c in range(10) if not centred or c != 3]  # a dead column's weight does not matter
    torch.testing.assert_close(target.double()[:, keep], fit[:, keep], rtol=1e-4, atol=1e-5)


def test_rounding_the_float_target_lowers_the_error_against_the_float_layer():
    # the error that counts is W f - W_q x: rounding W's target makes up for the inputs' error, rounding W does not
    torch.manual_seed(0)
    qw = _quant(nn.Linear(24, 8), bits=4)
    f, x = _float_and_quantized(800, 24, seed=4)
    sums = _sums(qw, x, f)
    h = sums.hessian(centred=False)
    w, floor = qw.layer.weight.detach(), _floor(qw)

    def error(choice):
        return (f @ w.T - x @ ((floor + choice) * qw.scale_like(w)).T).pow(2).sum(1).mean()

    aimed, plain = layerwise_choice(qw, h, float_target(qw, h, sums.cross(False))), layerwise_choice(qw, h)
    assert error(aimed) < 0.85 * error(plain), (float(error(aimed)), float(error(plain)))


@pytest.mark.parametrize("aim", [True, False], ids=["aimed at the float graph", "at the float weights"])
def test_each_layer_chooses_on_the_inputs_of_the_layers_above_at_their_choices(tiny_net, monkeypatch, aim):
    # reference: with every layer at its choice, one plain forward of each graph per batch; a layer's moments
    # from its inputs there must give the choice the staged run made (values kept in float32 for the comparison),
    # rounding the float target with `start_aim` and the float weights without
    monkeypatch.setattr(frontier, "_HALF_MAX", -1.0)
    sequential, checked = layerwise.sequential_choices, []

    def checking(student, teacher, layers, batches, world, sensitivity=None, aim=True, sweeps=0):
        choices = sequential(student, teacher, layers, batches, world, sensitivity, aim, sweeps)
        names = {qw: name for name, qw in student.named_modules() if isinstance(qw, QuantWeight)}
        inputs = {}
        hooks = [qw.register_forward_pre_hook(_keep_input(inputs, ("q", qw))) for qw in layers]
        hooks += [
            teacher.get_submodule(names[qw]).register_forward_pre_hook(_keep_input(inputs, ("f", qw))) for qw in layers
        ]
        for qw, choice in zip(layers, choices):
            layerwise.use_choice_(qw, choice)
        sums = {qw: Moments(qw.layer) for qw in layers}
        for x in batches:
            student(x), teacher(x)
            for qw in layers:
                sums[qw].add_(qw.layer, inputs["q", qw], inputs["f", qw])
        for h in hooks:
            h.remove()
        for qw, choice in zip(layers, choices):
            qw.live = None
            h = sums[qw].hessian(qw.input_mean is not None)
            target = float_target(qw, h, sums[qw].cross(qw.input_mean is not None)) if aim else None
            expected = layerwise_choice(qw, h, target)
            assert torch.equal(expected, choice), names[qw]
            checked.append(names[qw])
        return choices

    monkeypatch.setattr(rounding_train, "sequential_choices", checking)
    _eptq(tiny_net, bits=3, iterations=0, start="layerwise", start_aim=aim)
    assert len(checked) == 4


def _keep_input(store: dict, key):
    def keep(module, args):
        store[key] = args[0]

    return keep


def test_soft_rounding_starts_at_the_choice_with_its_confidence():
    torch.manual_seed(0)
    layers = [_quant(nn.Conv2d(4, 6, 3).to(memory_format=torch.channels_last)), _quant(nn.Linear(6, 3))]
    choice = (seeded(*layers[0].layer.weight.shape, seed=8) > 0).float()
    soft = SoftRounding(layers)
    v1 = soft.v.detach()[soft.sizes[0] :].clone()
    soft.start_from_([choice, None], 0.8)
    soft.refresh()
    w = layers[0].layer.weight.detach()
    h = (layers[0].quantized_weight().detach() / layers[0].scale_like(w)) - torch.floor(w / layers[0].scale_like(w))
    free = (torch.floor(w / layers[0].scale_like(w)).abs() < 7).float()  # inside the grid: h is free there
    torch.testing.assert_close(h * free, (0.2 + 0.6 * choice) * free, rtol=0, atol=1e-5)
    assert torch.equal(soft.v.detach()[soft.sizes[0] :], v1)  # a layer without a choice keeps its float start
    floor = _floor(layers[0])
    assert torch.equal((soft.hard_codes()[0] - floor) * free, choice * free)  # hardening now gives the choice
    with pytest.raises(ConfigError, match=r"confidence must lie in \(0.5, 1\]"):
        soft.start_from_([choice, None], 1.5)
    soft.close()


def test_a_start_at_full_confidence_keeps_the_choice_and_trains_the_rest():
    # confidence 1: the soft weight is the hard weight of the choice, V gets no gradient, the biases and step
    # factors still do
    torch.manual_seed(0)
    layer = _quant(nn.Conv2d(4, 6, 3))
    choice = (seeded(*layer.layer.weight.shape, seed=8) > 0).float()
    soft = SoftRounding([layer], train_scale=True)
    soft.start_from_([choice], 1.0)
    soft.refresh()
    step = layer.scale_like(layer.layer.weight)
    free = (_floor(layer).abs() < 7).float()  # inside the grid: the choice is free there
    assert torch.equal(layer.live[0].detach(), soft.hard_codes()[0] * step)
    assert torch.equal((soft.hard_codes()[0] - _floor(layer)) * free, choice * free)
    layer(seeded(2, 4, 8, 8, seed=3)).square().sum().backward()
    assert soft.v.grad is None or not soft.v.grad.any()
    assert soft.bias.grad.abs().sum() > 0 and soft.scale_factor.grad.abs().sum() > 0
    soft.close()


def test_a_kept_choice_skips_the_weights_gradients():
    # every layer given a choice at confidence 1 and no step factors: the soft weight is a constant, so the
    # backward computes no gradient for it (nor for V), the regulariser is exactly 0, and the biases still train
    torch.manual_seed(0)
    layers = [_quant(nn.Conv2d(4, 6, 3)), _quant(nn.Conv2d(6, 5, 1))]
    choices = [(seeded(*qw.layer.weight.shape, seed=8 + k) > 0).float() for k, qw in enumerate(layers)]
    soft = SoftRounding(layers)
    soft.start_from_(choices, 1.0)
    soft.refresh()
    assert not soft.v.requires_grad and not any(qw.live[0].requires_grad for qw in layers)
    assert float(soft.regularizer(2.0)) == 0.0 == float(rounding_penalty(rectified_sigmoid(soft.v), 2.0))
    layers[1](layers[0](seeded(2, 4, 8, 8, seed=3))).square().sum().backward()
    assert soft.v.grad is None and soft.bias.grad.abs().sum() > 0
    soft.close()
    partial = SoftRounding(layers)  # a layer without a choice starts at its float weight: V trains
    partial.start_from_([choices[0], None], 1.0)
    assert partial.v.requires_grad
    partial.close()


def test_bad_start_settings_are_refused():
    with pytest.raises(ConfigError, match="start_confidence in"):
        RoundingConfig(start_confidence=0.5)
    with pytest.raises(ConfigError, match="start"):
        RoundingConfig(start="gptq")


def test_a_layerwise_start_without_steps_hardens_to_the_layer_local_rounding(tiny_net):
    # no optimization steps: every layer ends at its own layer-local choice, on the inputs the quantized graph
    # gives it; on this net it distils better than round-to-nearest. Only the keep-best check reads loss weights:
    # no LFH is computed for it, the interest tensors count alike
    qgm, report = _eptq(tiny_net, bits=3, iterations=0, start="layerwise", keep_best=True)
    r = report.rounding
    assert r["start"] == "layerwise" and r["start_seconds"] > 0 and r["kept"] == "eptq"
    assert r["loss_weights"] == "mean" and "LFH" not in report.stage_seconds
    assert "LFH" in _eptq(tiny_net, bits=3, iterations=1, start="layerwise")[1].stage_seconds
    assert r["check_loss"] < r["rtn_check_loss"]
    rtn, _ = _eptq(tiny_net, bits=3, iterations=0)
    changed = 0
    for name, qw in _quant_layers(qgm).items():
        ref = _quant_layers(rtn)[name]  # round-to-nearest: hardened from V at its float start
        ours, nearest = ((m.layer.weight.detach() / m.scale_like(m.layer.weight)).round() for m in (qw, ref))
        assert (ours - nearest).abs().max() <= 1, name  # a float weight's other grid point at most
        changed += int((ours != nearest).sum())
    assert changed > 0, "the layer-local start chose round-to-nearest everywhere"


def test_layers_whose_patches_do_not_unfold_keep_the_float_start():
    assert layerwise.supports(nn.Conv2d(2, 2, 3, padding="same")) and layerwise.supports(nn.Linear(2, 2))
    assert not layerwise.supports(nn.Conv2d(2, 2, 2, padding="same"))  # uneven padding
    assert not layerwise.supports(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    assert not layerwise.supports(nn.Conv1d(2, 2, 3))


class _ClassToken(nn.Module):
    """A class token put before the tokens, two linear layers with a mixing of the tokens between them, and a head
    that reads the class token alone, as a ViT's does."""

    def __init__(self, width: int = 6, classes: int = 4):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, width) * 3)
        self.a, self.b = nn.Linear(width, width), nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.after_a(self.a(torch.cat([self.cls.expand(x.shape[0], 1, -1), x], 1)))

    def after_a(self, y):
        h = torch.tanh(y)
        return self.after_b(self.b(h + h.mean(1, keepdim=True)))

    def after_b(self, y):
        return self.head(torch.tanh(y)[:, 0])


def _jacobian_norms(f, y: torch.Tensor) -> torch.Tensor:
    """sum over outputs and channels of (d f / d y)^2 at each image and token of y (images do not interact)."""
    jac = torch.autograd.functional.jacobian(f, y.detach())  # (images, outputs, images, tokens, channels)
    return jac.square().sum((1, 4)).diagonal(dim1=0, dim2=1).t()


def _tapped(gm, channels: dict):
    """`gm` returning its output and the values of the nodes named in `channels`, as the start taps them."""
    nodes = nodes_by_name(gm)
    return with_taps(gm, [nodes[name] for name in channels])


def test_position_sensitivity_is_the_output_jacobians_norm_at_each_position():
    # exact reference: the Jacobian of the output with respect to each layer's output at each token, squared and
    # summed; the tokens of b the output does not read get exactly the uniform share
    torch.manual_seed(0)
    model = _ClassToken().eval()
    gm = torch.fx.symbolic_trace(model)
    x = seeded(3, 5, 6, seed=1)
    with torch.no_grad():
        y_a = model.a(torch.cat([model.cls.expand(3, 1, -1), x], 1))
        h = torch.tanh(y_a)
        y_b = model.b(h + h.mean(1, keepdim=True))
    exact = {"a": _jacobian_norms(model.after_a, y_a), "b": _jacobian_norms(model.after_b, y_b)}
    channels = {"a": -1, "b": -1}
    full = layerwise._position_weights_of(
        _tapped(gm, channels), channels, x, layerwise.Sensitivity(1.0, 4000, (0,)), seed=0
    )
    for name, s in exact.items():
        torch.testing.assert_close(full[name], s / s.mean(), rtol=0.1, atol=1e-6, msg=name)
    half = layerwise._position_weights_of(
        _tapped(gm, channels), channels, x, layerwise.Sensitivity(0.5, 4, (0,)), seed=0
    )
    assert torch.equal(half["b"][:, 1:], torch.full((3, 5), 0.5))
    # the class token holds all of b's sensitivity, normalised over 6 tokens of 3 images
    torch.testing.assert_close(half["b"][:, 0].mean(), torch.tensor(0.5 + 0.5 * 6))


def test_sensitivity_weighted_start_lowers_the_error_on_what_the_output_reads():
    # a 3-bit layer-local start that weighs every token alike spends its error feedback on the tokens, whose
    # inputs differ from the class token's; half its weight on the output's sensitivity aims it at what counts
    torch.manual_seed(0)
    model = _ClassToken(width=32, classes=8).eval()
    calib = [seeded(8, 12, 32, seed=i) for i in range(4)]
    held_out = seeded(32, 12, 32, seed=99)

    def output_error(share: float) -> float:
        cfg = PTQConfig(
            target=INT8.with_bits(3),
            method=Method.EPTQ,
            rounding=RoundingConfig(iterations=0, start="layerwise", keep_best=False, start_sensitivity=share),
            lfh=LFHConfig(min_probes=2, max_probes=2, images=8, batch_size=8),
            progress=False,
        )
        qgm, _ = fxq.quantize(model, calib, cfg)
        with torch.no_grad():
            return float((qgm(held_out) - model(held_out)).square().mean())

    uniform, weighted = output_error(0.0), output_error(0.5)
    assert weighted < 0.6 * uniform, (weighted, uniform)


def test_moments_short_of_positive_definite_get_more_damping_not_an_error():
    # float32 sums of a near-constant input can leave H with a small negative eigenvalue past the 1 % damping
    qw = _quant(nn.Linear(2, 4))
    h = torch.tensor([[[1.0, 1.1], [1.1, 1.0]]])  # eigenvalues 2.1 and -0.1
    choice = layerwise_choice(qw, h)
    assert choice.shape == qw.layer.weight.shape and set(choice.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(layerwise._damped(h))  # the damping alone does not make it factor


class _ConstantTable(nn.Module):
    """A linear layer on a constant table (as a relative-position bias network is) beside one on the input."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.randn(5, 3))
        self.bias_net, self.a = nn.Linear(3, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) + self.bias_net(self.table)


def test_a_value_made_of_constants_alone_weighs_its_positions_alike():
    torch.manual_seed(0)
    model = _ConstantTable().eval().requires_grad_(False)
    gm = torch.fx.symbolic_trace(model)
    channels = {"bias_net": -1, "a": -1}
    weights = layerwise._position_weights_of(
        _tapped(gm, channels), channels, seeded(2, 5, 4, seed=1), layerwise.Sensitivity(0.5, 2, (0,)), seed=0
    )
    assert torch.equal(weights["bias_net"], torch.ones(5))
    assert weights["a"].shape == (2, 5)
