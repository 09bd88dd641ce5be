"""EPTQ rounding: soft quantizer init, hard rounding on the grid, lr = 0 is RTN, the loss falls, resume."""

import pytest
import torch
from torch import nn

import fxq
from fxq.config import LFHConfig, LossWeights, Method, PTQConfig, RoundingConfig
from fxq.data.evaluate import kl_per_image, log_probs
from fxq.eptq import train as rounding_train
from fxq.eptq.schedule import batch_indices, beta_at, lr_rounding_at
from fxq.errors import CheckpointError, ConfigError, GraphCheckFailed
from fxq.quant import modules as quant_modules
from fxq.quant.modules import QuantWeight, layer_forward, mean_output_shift
from fxq.targets import INT8
from tests.conftest import bytes_per_weight, conv_stack, room_for, seeded

CALIB = [seeded(8, 3, 16, 16, seed=i) for i in range(4)]


def _eptq(model, bits=3, **rounding):
    cfg = PTQConfig(
        target=INT8.with_bits(bits),
        method=Method.EPTQ,
        rounding=RoundingConfig(**{"iterations": 60, "batch_size": 8, "keep_best": False, **rounding}),
        lfh=LFHConfig(min_probes=2, max_probes=4, images=8, batch_size=8),
        progress=False,
    )
    return fxq.quantize(model, CALIB, cfg)


def _losses(report) -> list[float]:
    return [loss for _, loss in report.rounding["history"]]


def _quant_layers(gm):
    return {n: m for n, m in gm.named_modules() if isinstance(m, QuantWeight)}


def _assert_on_grid(qgm) -> None:
    layers = _quant_layers(qgm)
    assert len(layers) == 4
    for qw in layers.values():
        w = qw.layer.weight.detach()
        codes = (w / qw.scale_like(w)).round()
        assert torch.equal(codes * qw.scale_like(w), w), "weights off the grid"
        assert codes.min() >= qw.spec.qmin and codes.max() <= qw.spec.qmax
        assert qw.soft_codes is None and qw.live is None
        torch.testing.assert_close(qw.quantized_weight(), w, rtol=0, atol=0)  # RTN of the result is itself


@pytest.mark.slow
def test_compiled_student_and_teacher_train_the_same_run(tiny_net):
    """compile=True (torch.compile of both graphs, meant for the GPU) on the CPU: the losses of the eager run."""
    qgm, compiled = _eptq(tiny_net, iterations=8, compile=True)
    _, eager = _eptq(tiny_net, iterations=8)
    a, b = _losses(compiled), _losses(eager)
    assert len(a) == 8 and a == pytest.approx(b, rel=1e-3)
    _assert_on_grid(qgm)


def test_hardened_weights_lie_on_their_integer_grid(tiny_net):
    qgm, report = _eptq(tiny_net, iterations=20)
    _assert_on_grid(qgm)
    assert report.rounding["iterations"] == 20 and len(report.rounding["history"]) > 0


def test_bf16_autocast_the_gpu_default_runs_on_the_cpu_and_tracks_fp32(tiny_net):
    """amp=True forces the autocast path CUDA takes by default: the same run up to bf16 rounding."""
    qgm, amp = _eptq(tiny_net, iterations=20, amp=True)
    _, fp32 = _eptq(tiny_net, iterations=20, amp=False)
    a, b = _losses(amp), _losses(fp32)
    assert a != b, "amp=True did not autocast on the CPU"  # identical runs otherwise: the same seed and batches
    assert a == pytest.approx(b, rel=0.1)
    _assert_on_grid(qgm)
    assert not torch.is_autocast_enabled("cpu")  # left as it was


def test_zero_learning_rates_reproduce_rtn_exactly(tiny_net):
    rtn, _ = fxq.quantize(tiny_net, CALIB, PTQConfig(target=INT8.with_bits(3), progress=False))
    eptq, _ = _eptq(tiny_net, iterations=10, lr_rounding=0.0, lr_bias=0.0)
    for (name, a), b in zip(_quant_layers(rtn).items(), _quant_layers(eptq).values()):
        assert torch.equal(a.quantized_weight(), b.quantized_weight()), name
        assert torch.equal(a.layer.bias, b.layer.bias), name
    x = seeded(4, 3, 16, 16, seed=11)
    torch.testing.assert_close(eptq(x), rtn(x), rtol=0, atol=0)


def test_keep_best_falling_back_restores_rtn_exactly_steps_included(tiny_net):
    """Step factors trained far off (and V, biases frozen): the result distils worse than RTN, so the check keeps
    RTN: its weights, biases and steps bit for bit, though hardening had multiplied the steps."""
    rtn, _ = fxq.quantize(tiny_net, CALIB, PTQConfig(target=INT8.with_bits(3), progress=False))
    settings = dict(lr_rounding=0.0, lr_bias=0.0, train_scale=True, lr_scale=50.0, keep_best=True)
    eptq, report = _eptq(tiny_net, iterations=10, **settings)
    assert report.rounding["kept"] == "rtn" and report.rounding["check_loss"] > report.rounding["rtn_check_loss"]
    for (name, a), b in zip(_quant_layers(rtn).items(), _quant_layers(eptq).values()):
        assert torch.equal(a.scale, b.scale), name
        assert torch.equal(a.quantized_weight(), b.quantized_weight()), name
        assert torch.equal(a.layer.bias, b.layer.bias), name
    x = seeded(4, 3, 16, 16, seed=11)
    torch.testing.assert_close(eptq(x), rtn(x), rtol=0, atol=0)


def test_the_report_gives_the_share_of_the_weights_whose_rounding_the_steps_changed(tiny_net):
    rtn, _ = fxq.quantize(tiny_net, CALIB, PTQConfig(target=INT8.with_bits(2), progress=False))
    _, still = _eptq(tiny_net, bits=2, iterations=10, lr_rounding=0.0)
    assert still.rounding["rounding_changed"] == 0.0
    eptq, report = _eptq(tiny_net, bits=2, iterations=150, warmup=0.9, lr_rounding=5e-2)
    changed = free = 0
    for name, a in _quant_layers(rtn).items():  # RTN's grid codes against the result's, where the grid has a choice
        b = _quant_layers(eptq)[name]
        step = a.scale_like(a.layer.weight)
        moved = (a.quantized_weight() / step).round() != (b.quantized_weight() / step).round()
        chooses = a.rounding_bounds()[1] > 0
        changed, free = changed + int((moved & chooses).sum()), free + int(chooses.sum())
    assert changed > 0 and report.rounding["rounding_changed"] == changed / free


def test_the_distillation_loss_falls(tiny_net):
    _, report = _eptq(tiny_net, bits=2, iterations=150, warmup=0.9, lr_rounding=5e-2)
    losses = _losses(report)
    assert len(losses) >= 20
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)


def test_keep_best_never_ends_worse_than_rtn_on_its_check_images(tiny_net):
    _, report = _eptq(tiny_net, bits=2, iterations=30, keep_best=True)
    r = report.rounding
    assert r["kept"] in ("eptq", "rtn")
    assert min(r["check_loss"], r["rtn_check_loss"]) == (
        r["check_loss"] if r["kept"] == "eptq" else r["rtn_check_loss"]
    )


def test_the_check_loss_is_a_mean_over_its_images_whatever_the_batch(tiny_net):
    """RTN's check loss at batches of 2 and of 8 (16 and 4 batches over the same images): about the same value, not
    one in proportion to the number of batches. Each batch's loss is relative to its own images' energy, so the
    two differ by how much that varies between batches."""
    losses = [_eptq(tiny_net, iterations=0, batch_size=b, keep_best=True)[1].rounding for b in (2, 8)]
    assert len(CALIB) * len(CALIB[0]) == 32  # the check reads every image here
    small, large = (r["rtn_check_loss"] for r in losses)
    assert small == pytest.approx(large, rel=0.01)


def test_plain_mean_weights_need_no_lfh(tiny_net):
    qgm, report = _eptq(tiny_net, iterations=5, loss_weights="mean")
    assert "LFH" not in report.stage_seconds and report.rounding["loss_weights"] == "mean"


def test_the_output_share_sets_the_output_s_weight_and_keeps_the_hidden_ratios(tiny_net, monkeypatch):
    seen = []
    real = rounding_train.interest_weights
    monkeypatch.setattr(rounding_train, "interest_weights", lambda *a: seen.append(real(*a)) or seen[-1])
    _eptq(tiny_net, iterations=2)
    _eptq(tiny_net, iterations=2, output_share=0.7)
    lfh, shared = seen
    assert len(lfh) > 2 and float(shared.mean()) == pytest.approx(1.0)
    assert float(shared[0] / shared.sum()) == pytest.approx(0.7)
    torch.testing.assert_close(shared[1:] / shared[1:].sum(), lfh[1:] / lfh[1:].sum())
    assert float(lfh[0] / lfh.sum()) < 0.5  # the share moved


@pytest.mark.parametrize(
    "settings", [{"output_share": 1.0}, {"output_share": 0.0}, {"output_share": 0.3, "loss_weights": "output"}]
)
def test_a_bad_output_share_is_refused(settings):
    with pytest.raises(ConfigError, match="output_share"):
        RoundingConfig(**settings)


def test_an_output_share_without_one_output_tensor_is_refused(tiny_net):
    with pytest.raises(GraphCheckFailed, match="output_share"):
        rounding_train.interest_weights(torch.fx.symbolic_trace(tiny_net), LossWeights.MEAN, False, 0.2)


def test_the_output_kl_adds_its_weight_times_the_output_s_kl_to_each_step_s_loss(tiny_net, monkeypatch):
    kls, real = [], rounding_train.softmax_kl
    monkeypatch.setattr(rounding_train, "softmax_kl", lambda *a: kls.append(float(real(*a).detach())) or real(*a))
    still = {"bits": 2, "iterations": 8, "lr_rounding": 0.0, "lr_bias": 0.0}  # every step sees RTN's model
    _, plain = _eptq(tiny_net, **still)
    _, with_kl = _eptq(tiny_net, **still, output_kl=0.5)
    assert len(kls) == 8 and min(kls) > 0  # the steps', not the keep-best check's
    want = [loss + 0.5 * kl for loss, kl in zip(_losses(plain), kls)]
    assert _losses(with_kl) == pytest.approx(want, rel=1e-5)


def test_the_output_kl_brings_the_output_nearer_the_float_model_s(tiny_net):
    with torch.no_grad():  # class scores far apart, as a classifier's: the KL then weighs the top classes
        tiny_net.head.weight.mul_(30.0)
    x = torch.cat(CALIB)
    ref = log_probs(tiny_net, x)
    kl = {}
    for weight in (0.0, 5.0):
        qgm, _ = _eptq(tiny_net, bits=2, iterations=150, warmup=0.9, lr_rounding=5e-2, output_kl=weight)
        kl[weight] = float(kl_per_image(log_probs(qgm, x), ref).mean())
    assert kl[5.0] < 0.8 * kl[0.0], kl


def test_an_output_kl_without_one_output_tensor_is_refused(tiny_net):
    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_net

        def forward(self, x):
            y = self.net(x)
            return y, 2 * y

    with pytest.raises(ConfigError, match="output_kl .* does not return one tensor"):
        _eptq(TwoOutputs(), iterations=2, output_kl=1.0)


def _interrupted_and_resumed(model, tmp_path, monkeypatch, step: int, **settings) -> tuple[dict, object]:
    """A run interrupted at `step` and resumed from its last checkpoint gives the model of an uninterrupted run,
    bit for bit; returns that checkpoint and the resumed run's report."""
    straight, _ = _eptq(model, checkpoint_dir=str(tmp_path / "a"), **settings)
    real = rounding_train.batch_indices

    def interrupted(n, batch, at, seed):
        if at == step:
            raise KeyboardInterrupt
        return real(n, batch, at, seed)

    monkeypatch.setattr(rounding_train, "batch_indices", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _eptq(model, checkpoint_dir=str(tmp_path / "b"), **settings)
    monkeypatch.setattr(rounding_train, "batch_indices", real)
    saved = torch.load(tmp_path / "b" / "rounding.pt", weights_only=True)
    resumed, report = _eptq(model, checkpoint_dir=str(tmp_path / "b"), resume=True, **settings)
    for (name, a), b in zip(_quant_layers(straight).items(), _quant_layers(resumed).values()):
        assert torch.equal(a.layer.weight, b.layer.weight), name
        assert torch.equal(a.layer.bias, b.layer.bias), name
    return saved, report


@pytest.mark.parametrize(
    "variant", [{"start": "float"}, {"start": "layerwise"}, {"start": "float", "act_drop": 0.5}], ids=str
)
def test_resume_after_an_interrupt_gives_the_same_model(tiny_net, tmp_path, monkeypatch, variant):
    # a resumed layer-local start takes its V from the checkpoint, not from a new layer-local rounding; a resumed
    # QDrop run draws the same elements float at each step
    settings = {"iterations": 24, "checkpoint_every": 8, **variant}
    saved, report = _interrupted_and_resumed(tiny_net, tmp_path, monkeypatch, 13, **settings)
    assert saved["step"] == 8
    assert report.rounding["resumed_at"] == 8 and report.rounding["start_seconds"] is None


def test_resume_refuses_a_checkpoint_of_another_run(tiny_net, tmp_path):
    _eptq(tiny_net, iterations=8, checkpoint_every=4, checkpoint_dir=str(tmp_path))
    with pytest.raises(CheckpointError, match=r"different run \(iterations: checkpoint 8, this run 16\)"):
        _eptq(tiny_net, iterations=16, checkpoint_every=4, checkpoint_dir=str(tmp_path), resume=True)


def test_qdrop_leaves_its_share_of_activations_float_in_the_steps_alone(tiny_net, monkeypatch):
    seen = []
    real = quant_modules.drop_quantization

    def recorded(x, q, share, gen):
        out = real(x, q, share, gen)
        moved = q != x
        seen.append((share, float((out == x)[moved].float().mean())))
        return out

    monkeypatch.setattr(quant_modules, "drop_quantization", recorded)
    qgm, report = _eptq(tiny_net, iterations=6, act_drop=0.3, keep_best=True)
    acts = [m for m in qgm.modules() if isinstance(m, quant_modules.ActQuant)]
    assert len(seen) == 6 * len(acts)  # every quantizer in every step, and not in the keep-best check's forwards
    assert {share for share, _ in seen} == {0.3}
    assert 0.2 < sum(f for _, f in seen) / len(seen) < 0.4
    assert report.rounding["act_drop"] == 0.3
    assert all(m.drop is None for m in acts)  # the model handed back quantizes every element


def test_v_steps_at_the_hardening_rate_once_the_regulariser_is_on(tiny_net, monkeypatch):
    rates, step = [], torch.optim.RAdam.step

    def recorded(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.RAdam, "step", recorded)
    _eptq(tiny_net, iterations=10, warmup=0.3, lr_rounding=2e-2, lr_rounding_hardening=1e-3)
    assert rates == [2e-2] * 3 + [1e-3] * 7


def test_bad_rounding_settings_are_refused():
    with pytest.raises(ConfigError, match="act_drop"):
        RoundingConfig(act_drop=1.0)
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        RoundingConfig(resume=True)
    with pytest.raises(ConfigError, match="warmup"):
        RoundingConfig(warmup=1.5)
    with pytest.raises(ConfigError, match="learning rates"):
        RoundingConfig(lr_rounding_hardening=-1e-3)
    with pytest.raises(ConfigError, match="output_kl must be >= 0"):
        RoundingConfig(output_kl=-1.0)
    with pytest.raises(ConfigError, match="needs keep_best"):
        RoundingConfig(check_apart=True, keep_best=False)
    with pytest.raises(ConfigError, match="loss_weights"):
        RoundingConfig(loss_weights="hessian")


def test_schedule_and_sampler():
    cfg = RoundingConfig(iterations=100, warmup=0.2, beta=(20.0, 2.0))
    assert beta_at(19, cfg) is None and beta_at(20, cfg) == 20.0 and beta_at(100, cfg) == pytest.approx(2.0)
    assert {lr_rounding_at(s, cfg) for s in (0, 19, 20, 99)} == {cfg.lr_rounding}
    slower = RoundingConfig(iterations=100, warmup=0.2, lr_rounding_hardening=3e-3)
    assert [lr_rounding_at(s, slower) for s in (0, 19, 20, 99)] == [slower.lr_rounding] * 2 + [3e-3] * 2
    seen = torch.cat([batch_indices(10, 3, s, seed=0) for s in range(3)])
    assert len(set(seen.tolist())) == 9  # one epoch: no image twice
    assert torch.equal(batch_indices(10, 3, 7, 0), batch_indices(10, 3, 7, 0))
    assert len(batch_indices(2, 5, 0, 0)) == 5  # fewer images than a batch: repeated
    assert LossWeights("mean") is LossWeights.MEAN


def test_teacher_cache_matches_recomputing_the_teacher(tiny_net):
    _, cached = _eptq(tiny_net, iterations=12, teacher_cache="on")
    _, recomputed = _eptq(tiny_net, iterations=12, teacher_cache="off")
    assert cached.rounding["teacher_cache"] and not recomputed.rounding["teacher_cache"]
    a, b = _losses(cached), _losses(recomputed)
    assert a == pytest.approx(b, rel=2e-2)  # fp16 targets: the same run up to their rounding


def test_trainable_weight_steps_move_and_stay_consistent(tiny_net, tmp_path):
    rtn, _ = fxq.quantize(tiny_net, CALIB, PTQConfig(target=INT8.with_bits(3), progress=False))
    qgm, _ = _eptq(tiny_net, iterations=30, train_scale=True, lr_scale=0.05, checkpoint_dir=str(tmp_path))
    moved = False
    for a, b in zip(_quant_layers(rtn).values(), _quant_layers(qgm).values()):
        moved |= not torch.equal(a.scale, b.scale)
        w = b.layer.weight.detach()
        assert torch.equal((w / b.scale_like(w)).round() * b.scale_like(w), w)  # on the trained grid
    assert moved
    assert "scale_factor" in torch.load(tmp_path / "rounding.pt", weights_only=False)["soft"]


def test_the_optimized_model_exports_and_trains_with_the_training_kernels_only_inside(tiny_net, monkeypatch):
    seen = []
    real = quant_modules.fake_quant_trained_input
    monkeypatch.setattr(quant_modules, "fake_quant_trained_input", lambda *a: seen.append(1) or real(*a))
    qgm, _ = _eptq(tiny_net, iterations=3)
    assert seen  # the optimization trained with the CPU's training kernels
    assert not any(getattr(m, "training_kernels", False) for m in qgm.modules())  # and handed back the formula
    x = seeded(2, 3, 16, 16, seed=4)
    ep = torch.export.export(qgm, (x,))  # torch.export cannot trace the training kernels: they must be off
    torch.testing.assert_close(ep.module()(x), qgm(x))


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv2d(4, 6, 3),
        nn.Conv2d(4, 6, 3, groups=2),
        nn.Conv2d(6, 6, 3, groups=6),
        nn.Conv1d(4, 6, 3),
        nn.Linear(5, 3),
    ],
    ids=["conv", "grouped", "depthwise", "conv1d", "linear"],
)
def test_mean_output_shift_is_the_output_change_of_a_constant_input(layer):
    # an input constant per channel (no padding) makes every output position read E[x]: the output moves by
    # exactly the shift when the weight moves by dw
    torch.manual_seed(0)
    x_mean, dw = torch.randn(layer.weight.shape[1] * getattr(layer, "groups", 1)), 0.1 * torch.randn_like(layer.weight)
    x = x_mean.reshape(1, -1, *([1] * (layer.weight.dim() - 2))).expand(2, -1, *([5] * (layer.weight.dim() - 2)))
    w, b = layer.weight.detach(), layer.bias.detach()
    moved = layer_forward(layer, x, w + dw, b) - layer_forward(layer, x, w, b)
    shift = mean_output_shift(layer, dw, x_mean)
    torch.testing.assert_close(moved, shift.reshape(1, -1, *([1] * (moved.dim() - 2))).expand_as(moved))


class _SeqFirst(nn.Module):
    """A linear layer applied sequence-first: its output, an interest tensor, has the sequence as dimension 0."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):  # (batch, seq, 6)
        return self.head(self.embed(x.transpose(0, 1)).mean(0))


def test_a_tensor_without_the_batch_first_is_refused_by_name():
    calib = [seeded(8, 4, 6, seed=i) for i in range(2)]
    rc = RoundingConfig(iterations=2, batch_size=4, loss_weights="mean", keep_best=False)
    cfg = PTQConfig(target=INT8.with_bits(4), method=Method.EPTQ, rounding=rc, progress=False)
    with pytest.raises(GraphCheckFailed, match=r"\['embed'\] do not have the batch as their first dimension"):
        fxq.quantize(_SeqFirst().eval(), calib, cfg)


class _Windows(nn.Module):
    """A conv, then its output cut into 4 windows of 8x8 tokens folded into the batch (as windowed attention does),
    mixed by a linear layer with a residual add: an interest tensor of (images x windows, tokens, channels). Its
    offset is a 5-d buffer, as a windowed attention's mask is (channels-last conversion refuses those)."""

    def __init__(self, image_major: bool):
        super().__init__()
        self.image_major = image_major
        self.conv, self.mix, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 8), nn.Linear(8, 5)
        self.register_buffer("offset", torch.full((1, 8, 1, 1, 1), 0.1))

    def forward(self, x):  # (batch, 3, 16, 16)
        y = self.conv(x).relu().reshape(x.shape[0], 8, 2, 8, 16) + self.offset
        y = y.reshape(x.shape[0], 8, 2, 8, 2, 8)
        y = y.permute(0, 2, 4, 3, 5, 1) if self.image_major else y.permute(2, 4, 0, 3, 5, 1)
        w = y.reshape(-1, 64, 8)
        w = w + self.mix(w)
        return self.head(w.mean(1).reshape(-1, 4, 8).mean(1))


def test_rounding_takes_a_tensor_with_the_batch_folded_in_image_by_image():
    torch.manual_seed(0)
    model = _Windows(image_major=True).eval()
    qgm, report = _eptq(model, bits=3, loss_weights="mean", iterations=40)
    losses = _losses(report)
    assert losses[-1] < losses[0]
    assert len(_quant_layers(qgm)) == 3


def test_a_folded_batch_with_the_images_interleaved_is_refused():
    # windows x images: the rows of one image are not together, so no (images, -1) view holds an image per row
    torch.manual_seed(0)
    with pytest.raises(GraphCheckFailed, match=r"\['mix', 'add_1'\] do not have the batch as their first dimension"):
        _eptq(_Windows(image_major=False).eval(), bits=3, loss_weights="mean", iterations=2)


def test_an_optimization_whose_largest_layer_would_not_fit_in_free_memory_is_refused_before_it_starts(
    tiny_net, monkeypatch
):
    # conv_a's 576 weights at 72 or 128 bytes each: 10 kB free would not hold its state
    monkeypatch.setattr(rounding_train, "available_bytes", lambda device: 10_000)
    with pytest.raises(
        ConfigError, match=r"a layer of 576 weights needs about [\d.]+ KiB to optimize, and 9\.8 KiB is "
    ):
        _eptq(tiny_net, iterations=2)
    monkeypatch.setattr(rounding_train, "available_bytes", lambda device: None)  # unknown: no check
    _eptq(tiny_net, iterations=2)


def test_a_state_too_large_for_free_memory_is_optimized_in_groups_of_layers(monkeypatch):
    """With memory for 95 % of the state, the layers go in graph order into groups of at most half of it, each
    optimized in turn: every layer's rounding moves off round-to-nearest and the result lies on its grid."""
    model = conv_stack()
    room = room_for(model, 0.95)
    monkeypatch.setattr(rounding_train, "available_bytes", lambda device: room)
    held = []
    soft_rounding = rounding_train.SoftRounding

    def recording(layers, *args):
        held.append(sum(qw.layer.weight.numel() for qw in layers) * bytes_per_weight())
        return soft_rounding(layers, *args)

    monkeypatch.setattr(rounding_train, "SoftRounding", recording)
    qgm, report = _eptq(model, bits=2, iterations=60, lr_rounding=5e-2)
    assert report.rounding["groups"] == [2, 1, 2]  # 216 + 576, 576, 576 + 40 weights
    assert len(held) == 3 and max(held) <= 0.5 * room
    assert report.rounding["iterations"] == 60 and [s for s, _ in report.rounding["history"]][:1] == [0]
    monkeypatch.setattr(rounding_train, "available_bytes", lambda device: None)
    rtn, _ = fxq.quantize(model, CALIB, PTQConfig(target=INT8.with_bits(2), progress=False))
    for name, qw in _quant_layers(qgm).items():
        w = qw.layer.weight.detach()
        torch.testing.assert_close(qw.quantized_weight(), w, rtol=0, atol=0)  # on its grid
        assert not torch.equal(w, _quant_layers(rtn)[name].layer.weight), f"{name} kept its RTN rounding"


def test_the_groups_to_come_compute_at_their_layer_local_start(monkeypatch):
    """At confidence 1 the soft weights are the start's choice, so the first step's loss is the same whether all
    layers are optimized at once or the first group alone with the others held at their start."""
    model = conv_stack()
    settings = dict(bits=2, iterations=6, start="layerwise", start_confidence=1.0)
    monkeypatch.setattr(rounding_train, "available_bytes", lambda device: None)
    _, whole = _eptq(model, **settings)
    monkeypatch.setattr(rounding_train, "available_bytes", lambda device: room_for(model, 0.95))
    _, grouped = _eptq(model, **settings)
    assert whole.rounding["groups"] == [5] and len(grouped.rounding["groups"]) == 3
    assert _losses(grouped)[0] == pytest.approx(_losses(whole)[0], rel=1e-5)


@pytest.mark.parametrize("start", ["float", "layerwise"])
def test_a_run_in_groups_resumes_in_its_second_group_to_the_same_model(tmp_path, monkeypatch, start):
    """Interrupted in the second of three groups (its seventh step of eight): the checkpoint holds the first group
    hardened and the second's state; the third starts where it would have (a layer-local start is made again)."""
    model = conv_stack()
    monkeypatch.setattr(rounding_train, "available_bytes", lambda device: room_for(model, 0.95))
    settings = {"bits": 2, "iterations": 24, "checkpoint_every": 4, "start": start}
    saved, report = _interrupted_and_resumed(model, tmp_path, monkeypatch, 14, **settings)
    assert (saved["group"], saved["step"], len(saved["done"]), len(saved["parts"])) == (1, 4, 2, 1)
    assert len(report.rounding["groups"]) == 3
    assert report.rounding["resumed_at"] == 12 and report.rounding["iterations"] == 24


def test_a_plain_conv_stack_distils_its_output_alone():
    """conv/ReLU layers then a linear head (VGG, AlexNet): every conv output feeds an activation and the head's
    is the model output, so there is no interest tensor; the rounding distils the output alone."""
    torch.manual_seed(0)
    vgg = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 5),
    ).eval()  # fmt: skip
    qgm, report = _eptq(vgg, bits=2, iterations=40, warmup=0.5, lr_rounding=5e-2)
    assert not [lr for lr in report.layers if lr.interest] and report.rounding["iterations"] == 40
    losses = _losses(report)
    assert losses[-1] < losses[0]
    rtn, _ = fxq.quantize(vgg, CALIB, PTQConfig(target=INT8.with_bits(2), progress=False))
    moved = [not torch.equal(a.quantized_weight(), b.quantized_weight()) for a, b in
             zip(_quant_layers(rtn).values(), _quant_layers(qgm).values())]  # fmt: skip
    assert any(moved)
