"""A frozen prefix: the graph's cuts, the graph from a cut, and the rounding's steps past the first layers."""

import pytest
import torch
from torch import fx, nn

import fxq
from fxq.config import Method, PTQConfig, RoundingConfig
from fxq.eptq import train as rounding_train
from fxq.eptq.prefix import frozen_prefix, prefix_loss
from fxq.errors import ConfigError
from fxq.ir.graph import cuts
from fxq.ir.taps import from_cut, interest_nodes, quantized_value, up_to
from fxq.quant.modules import QuantWeight
from fxq.targets import INT8
from tests.conftest import conv_stack, room_for, seeded
from tests.test_rounding import CALIB, _interrupted_and_resumed


class ResidualWithBatchRead(nn.Module):
    """A residual block between a stem and a head, and the batch size read off the input at the start and used at
    the end (as EfficientNet-PyTorch does)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        n = x.size(0)
        x = torch.relu(self.stem(x))
        y = self.b(torch.relu(self.a(x))) + x
        return self.head(y.mean((2, 3)).view(n, -1))


def test_cuts_skip_the_inside_of_a_residual_block_and_ignore_reads_of_the_input_shape():
    gm = fx.symbolic_trace(ResidualWithBatchRead())
    assert [n.name for n in cuts(gm)] == ["stem", "relu", "add", "mean", "view", "head"]


def test_a_graph_with_two_inputs_has_no_cut():
    class TwoInputs(nn.Module):
        def forward(self, x, y):
            return torch.relu(x) + y

    assert cuts(fx.symbolic_trace(TwoInputs())) == []


def test_the_graph_from_each_cut_computes_the_whole_graph():
    gm = fx.symbolic_trace(ResidualWithBatchRead())
    x = seeded(3, 3, 8, 8)
    add = next(n for n in gm.graph.nodes if n.name == "add")
    whole, tapped = gm(x), {}
    for cut in cuts(gm):
        taps = [add] if list(gm.graph.nodes).index(add) > list(gm.graph.nodes).index(cut) else []
        out = from_cut(gm, cut, taps)(up_to(gm, cut)(x), x)
        assert torch.equal(out[0], whole), cut.name
        if taps:
            tapped[cut.name] = out[1]
    assert set(tapped) == {"stem", "relu"}
    assert torch.equal(tapped["stem"], tapped["relu"])


def projected_stack() -> nn.Module:
    """A first conv with no activation after it (its output an interest tensor: fxq.passes.interest_points), then
    conv/ReLU layers and a linear head: 216 of the 1984 weights in the first conv (11 %)."""
    torch.manual_seed(0)
    convs = [nn.Conv2d(3, 8, 3, padding=1)] + [nn.Conv2d(8, 8, 3, padding=1) for _ in range(3)]
    layers = [convs[0]] + [m for conv in convs[1:] for m in (conv, nn.ReLU())]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


def _eptq(model, **rounding):
    settings = {"iterations": 1, "batch_size": 8, "keep_best": False, "start": "layerwise", "loss_weights": "mean"}
    cfg = PTQConfig(
        target=INT8.with_bits(3),
        method=Method.EPTQ,
        rounding=RoundingConfig(**{**settings, **rounding}),
        progress=False,
    )
    return fxq.quantize(model, CALIB, cfg)


def _layers(gm) -> list[QuantWeight]:
    return [m for m in gm.modules() if isinstance(m, QuantWeight)]


def test_the_first_layers_keep_their_layer_local_choice_and_the_rest_train():
    start, _ = _eptq(projected_stack(), iterations=0)
    trained, report = _eptq(projected_stack(), iterations=20, frozen_share=0.15, lr_rounding=0.5, optimizer="adam")
    prefix = report.rounding["frozen_prefix"]
    assert prefix["layers"] == 1 and prefix["weight_share"] == pytest.approx(216 / 1984)
    assert prefix["tensors"] == 1  # the first conv's output: a constant of the loss now
    first, *rest = zip(_layers(start), _layers(trained))
    assert torch.equal(first[0].layer.weight, first[1].layer.weight)
    assert torch.equal(first[0].layer.bias, first[1].layer.bias)
    assert any(not torch.equal(a.layer.weight, b.layer.weight) for a, b in rest)
    assert _eptq(projected_stack(), iterations=20, frozen_share=0.05)[1].rounding["frozen_prefix"] is None  # too small


def test_steps_past_the_prefix_move_the_other_layers_as_the_whole_graph_would(tmp_path):
    """With the layer-local choice kept (confidence 1: V gets no gradient) only the biases train; the first step's
    bias change of every layer past the prefix is the whole graph's: the left-out terms are constants and the
    kept ones weigh as in the whole loss."""
    settings = {"start_confidence": 1.0, "lr_bias": 1.0, "checkpoint_every": 1}

    def biases(folder: str, **more) -> torch.Tensor:
        _eptq(projected_stack(), checkpoint_dir=str(tmp_path / folder), **{**settings, **more})
        return torch.load(tmp_path / folder / "rounding.pt", weights_only=True)["soft"]["bias"]

    before = biases("before", frozen_share=0.15, lr_bias=0.0)
    past, whole = biases("past", frozen_share=0.15), biases("whole", frozen_share=0.0)
    assert len(whole) == len(past) + 8  # the first conv's 8 channels are frozen
    moved = past - before
    assert moved.abs().max() > 1e-3
    torch.testing.assert_close(moved, whole[8:] - before, rtol=1e-3, atol=1e-6)


def test_resume_with_a_frozen_prefix_gives_the_same_model(tmp_path, monkeypatch):
    settings = {"iterations": 12, "checkpoint_every": 4, "start": "layerwise", "frozen_share": 0.15, "keep_best": True}
    saved, report = _interrupted_and_resumed(projected_stack(), tmp_path, monkeypatch, 6, **settings)
    assert saved["step"] == 4 and report.rounding["resumed_at"] == 4
    assert report.rounding["frozen_prefix"]["layers"] == 1


def test_the_keep_best_check_runs_on_the_whole_graph():
    """Against RTN, whose first layers differ from the frozen ones: the check's losses are the whole graph's."""
    _, frozen = _eptq(projected_stack(), iterations=0, keep_best=True)
    _, past = _eptq(projected_stack(), iterations=1, frozen_share=0.15, keep_best=True, lr_rounding=0.0, lr_bias=0.0)
    # the same losses up to the float16 of the check's cached targets (the run without steps recomputes them); the
    # loss past the prefix alone is a fraction of it
    assert past.rounding["rtn_check_loss"] == pytest.approx(frozen.rounding["rtn_check_loss"], rel=1e-3)
    assert past.rounding["check_loss"] == pytest.approx(frozen.rounding["check_loss"], rel=1e-3)
    assert past.rounding["history"][0][1] < 0.5 * past.rounding["check_loss"]


@pytest.mark.parametrize("settings", [{"frozen_share": 0.0}, {"frozen_share": 0.15, "prefix_steps": 3}])
def test_check_apart_keeps_the_check_s_images_out_of_the_start_and_the_steps(monkeypatch, settings):
    """The check's 8 images (the first) are read by the check alone: not by the layer-local start, the prefix's
    training or the steps, which read every other image. Without check_apart the steps read them too."""
    monkeypatch.setattr(rounding_train, "_CHECK_IMAGES", 8)
    every = torch.cat(CALIB).flatten(1)
    read = {"fit": set(), "check": set()}
    phase = ["fit"]

    def record(x: torch.Tensor) -> None:
        d = torch.cdist(x.float().flatten(1), every, compute_mode="donot_use_mm_for_euclid_dist")
        assert float(d.min(1).values.max()) < 1e-4  # each row one of the images
        read[phase[0]].update(d.argmin(1).tolist())

    losses, keep_best = rounding_train.RoundingOptimizer._losses, rounding_train.RoundingOptimizer._keep_best
    choices = rounding_train.sequential_choices

    def recorded_losses(self, student, targets, batch, xs, *rest):
        record(xs[0])
        return losses(self, student, targets, batch, xs, *rest)

    def checked(self, *args):  # the prefix's check, then the whole graph's
        phase[0] = "check"
        try:
            return keep_best(self, *args)
        finally:
            phase[0] = "fit"

    def recorded_choices(gm, teacher, layers, batches, *args):
        for x in batches:
            record(x)
        return choices(gm, teacher, layers, batches, *args)

    monkeypatch.setattr(rounding_train.RoundingOptimizer, "_losses", recorded_losses)
    monkeypatch.setattr(rounding_train.RoundingOptimizer, "_keep_best", checked)
    monkeypatch.setattr(rounding_train, "sequential_choices", recorded_choices)
    run = dict(iterations=12, keep_best=True, start_images=None, **settings)
    _, report = _eptq(projected_stack(), check_apart=True, **run)
    assert (report.rounding["frozen_prefix"] is None) == (settings["frozen_share"] == 0)
    assert read == {"fit": set(range(8, len(every))), "check": set(range(8))}
    read["fit"], read["check"] = set(), set()
    _eptq(projected_stack(), **run)
    assert read["fit"] == set(range(len(every))) and read["check"] == set(range(8))


def test_check_apart_needs_more_images_than_the_check_s(monkeypatch):
    with pytest.raises(ConfigError, match="check_apart"):
        _eptq(projected_stack(), iterations=2, keep_best=True, check_apart=True)  # 32 images, a check of 128


def test_a_bad_frozen_share_is_refused():
    with pytest.raises(ConfigError, match="frozen_share"):
        RoundingConfig(frozen_share=1.0)


def test_the_prefix_trained_alone_keeps_what_lowers_its_loss_and_the_layers_past_it_choose_on_that():
    """The first two convolutions (40 % of the weights) trained alone on their own loss before they freeze; the
    result is kept where it beats their layer-local start on the check's images, and the layers past the prefix
    make their layer-local choice on the values of the prefix as kept."""
    settings = {"iterations": 2, "frozen_share": 0.45, "batch_size": 32, "optimizer": "adam", "keep_best": False}
    start, _ = _eptq(projected_stack(), **settings, lr_rounding=0.0, lr_bias=0.0)
    trained, report = _eptq(projected_stack(), **settings, prefix_steps=300, lr_rounding=0.05, start_confidence=0.95)
    steps = report.rounding["frozen_prefix"]["trained"]
    assert steps["iterations"] == 300 and report.rounding["frozen_prefix"]["layers"] == 2
    assert steps["kept"] == "trained" and steps["check_loss"] < 0.99 * steps["start_check_loss"]
    # the model holds the trained prefix: its rounding moved (in which of its layers depends on the CPU's kernels)
    assert any(not torch.equal(a.layer.weight, b.layer.weight) for a, b in zip(_layers(trained)[:2], _layers(start)))
    for qw in _layers(trained)[:2]:  # on the grid: hardened codes are what round-to-nearest gives back
        assert torch.equal(qw.layer.weight, qw.quantized_weight())
    # with nothing learned the steps give back the start, and every layer past the prefix chooses as before
    idle, idle_report = _eptq(projected_stack(), **settings, prefix_steps=5, lr_rounding=0.0, lr_bias=0.0)
    assert idle_report.rounding["frozen_prefix"]["trained"]["check_loss"] == pytest.approx(
        idle_report.rounding["frozen_prefix"]["trained"]["start_check_loss"]
    )
    for a, b in zip(_layers(idle), _layers(start)):
        torch.testing.assert_close(a.layer.weight, b.layer.weight, rtol=0, atol=0)
        torch.testing.assert_close(a.layer.bias, b.layer.bias)


def test_the_prefix_loss_gives_its_end_every_term_past_it():
    qgm, _ = _eptq(projected_stack(), iterations=0)
    prefix = frozen_prefix(qgm, 0.15)
    z = interest_nodes(qgm)
    weights = torch.arange(1.0, len(z) + 2)  # the output's first
    loss = prefix_loss(qgm, prefix, weights, with_output=True)
    inside = [k for k in range(len(z)) if k not in prefix.kept]
    assert loss.taps[0] is prefix.cut and len(loss.taps) == len(loss.weights)
    # every term lands once: the end's weight is the sum of the terms past the cut and its own
    own = [k for k in inside if quantized_value(z[k]) is prefix.cut]
    past = float(weights[0]) + sum(float(weights[k + 1]) for k in [*prefix.kept, *own])
    scale = len(loss.weights) / len(weights)
    assert float(loss.weights[0]) == pytest.approx(past * scale)
    assert float(loss.weights.sum()) == pytest.approx(float(weights.sum()) * scale)


def test_a_negative_prefix_step_count_is_refused():
    with pytest.raises(ConfigError, match="prefix_steps"):
        RoundingConfig(prefix_steps=-1)


def test_a_trained_prefix_computes_as_kept_when_the_layers_past_it_go_in_groups(monkeypatch):
    """Where the state of the layers past the prefix does not fit at once they are optimized in groups, the groups
    to come computing at their start; the trained prefix is hard already, and the cut's values come from it."""
    model = conv_stack()
    monkeypatch.setattr(rounding_train, "available_bytes", lambda device: room_for(model, 0.8))
    monkeypatch.setattr(rounding_train, "_PREFIX_ROOM", 1e3)  # the cut's values fit all the same
    first_live, at_cut = [], rounding_train.values_at

    def recording(gm, *args):
        first_live.append(next(m for m in gm.modules() if isinstance(m, QuantWeight)).live)
        return at_cut(gm, *args)

    monkeypatch.setattr(rounding_train, "values_at", recording)
    _, report = _eptq(model, iterations=4, frozen_share=0.15, prefix_steps=3)
    assert len(report.rounding["groups"]) > 1 and report.rounding["frozen_prefix"]["trained"]["iterations"] == 3
    assert first_live == [None]
