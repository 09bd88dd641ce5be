"""Mixed precision: the ILP against brute force, budgets, errors, and sensitivities against a direct re-run."""

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from torch import nn

import fxq
from fxq.config import LFHConfig, LossWeights, MixedPrecisionConfig, PTQConfig, measure_fields
from fxq.eptq.distillation import distillation_loss
from fxq.eptq.weights import interest_weights
from fxq.errors import ConfigError, GraphCheckFailed
from fxq.ir.downstream import Downstream
from fxq.ir.graph import copy_graph, float_graph, nodes_by_name
from fxq.ir.meta import gq, q
from fxq.ir.taps import interest_nodes, with_taps
from fxq.mp import sensitivity as mp
from fxq.mp.ilp import Budget, solve_allocation
from fxq.passes.observe import Calibrate
from fxq.pipeline import Stage, passes, run_passes
from fxq.quant.convert import is_calibrated
from fxq.quant.modules import ActQuant, QuantWeight
from fxq.quant.qmath import WeightError, fake_quant, scale_for, weight_thresholds
from fxq.targets import INT8
from tests.conftest import TinyNet, seeded

CALIB = [seeded(8, 3, 16, 16, seed=i) for i in range(2)]
LFH = LFHConfig(min_probes=2, max_probes=2, images=8, batch_size=8)


def sens(node, measure=None) -> dict:
    """A node's weight sensitivities under `measure` (default: the configured one, weighed first)."""
    by = q(node).sensitivity
    return by[measure or next(iter(by))]


def act_sens(node) -> dict:
    by = q(node).act_sensitivity
    return by[next(iter(by))]


def _brute_force(cost, budgets, allowed=None):
    best = None
    for choice in itertools.product(range(cost.shape[1]), repeat=cost.shape[0]):
        rows = np.arange(cost.shape[0])
        if allowed is not None and not allowed[rows, choice].all():
            continue
        if all(b.usage[rows, choice].sum() <= b.limit + 1e-9 for b in budgets):
            value = cost[rows, choice].sum()
            best = value if best is None else min(best, value)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_ilp_matches_brute_force_and_respects_the_budget(seed):
    rng = np.random.default_rng(seed)
    layers = int(rng.integers(1, 7))
    cost = np.sort(rng.random((layers, 3)), 1)[:, ::-1].copy()  # fewer bits, more sensitive
    numel = rng.integers(10, 1000, (layers, 1))
    memory = numel * np.array([[2, 4, 8]]) / 8
    bops = rng.random((layers, 1)) * np.array([[2, 4, 8]])
    budgets = [
        Budget("memory", memory, float(rng.uniform(memory.min(1).sum(), memory.max(1).sum()))),
        Budget("bops", bops, float(rng.uniform(bops.min(1).sum(), bops.max(1).sum()))),
    ]
    expected = _brute_force(cost, budgets)
    if expected is None:
        with pytest.raises(ConfigError):
            solve_allocation(cost, budgets)
        return
    alloc = solve_allocation(cost, budgets)
    assert alloc.objective == pytest.approx(expected, rel=1e-4, abs=1e-9)
    for b in budgets:
        assert alloc.usage[b.name] <= b.limit + 1e-9


@pytest.mark.parametrize("seed", range(6))
def test_ilp_with_options_a_row_cannot_take_matches_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    layers = int(rng.integers(2, 7))
    cost = rng.random((layers, 3))
    allowed = rng.random((layers, 3)) < 0.6
    allowed[np.arange(layers), rng.integers(0, 3, layers)] = True  # every row keeps one option
    memory = rng.integers(10, 1000, (layers, 1)) * np.array([[2, 4, 8]]) / 8
    budget = Budget("memory", memory, float(np.where(allowed, memory, np.inf).min(1).sum() * 1.5))
    expected = _brute_force(cost, [budget], allowed)
    alloc = solve_allocation(cost, [budget], allowed=allowed)
    assert allowed[np.arange(layers), alloc.choice].all()
    assert alloc.objective == pytest.approx(expected, rel=1e-4, abs=1e-9)
    assert alloc.usage["memory"] <= budget.limit + 1e-9


def test_an_infeasible_budget_names_the_smallest_feasible_one():
    usage = np.array([[1.0, 2.0, 4.0], [10.0, 20.0, 40.0]])
    with pytest.raises(ConfigError, match=r"infeasible; the smallest choice needs 11"):
        solve_allocation(np.ones((2, 3)), [Budget("weight memory (bytes)", usage, 10.0)])


def test_a_budget_exactly_at_the_smallest_choice_is_feasible():
    usage = np.array([[1.0, 2.0], [3.0, 4.0]])
    alloc = solve_allocation(np.array([[1.0, 0.0], [1.0, 0.0]]), [Budget("m", usage, 4.0)])
    assert alloc.choice == [0, 0] and alloc.usage["m"] == 4.0


def _analyzed(model, weight_error=WeightError.MSE, **mp_cfg):
    cfg = PTQConfig(
        target=INT8.with_bits(4),
        mixed_precision=MixedPrecisionConfig(**{"avg_bits": 4.0, "images": 8, "batch_size": 4, **mp_cfg}),
        lfh=LFH,
        weight_error=weight_error,
        progress=False,
    )
    return fxq.analyze(model, CALIB, cfg), cfg


def _weight_as_quantize_makes_it(layer, x, spec, cfg) -> torch.Tensor:
    """Written out apart from the pass: the MSE threshold, each weight's error weighted by its input
    channel's variance for WeightError.OUTPUT (TinyNet has no grouped convs)."""
    w = layer.weight.detach()
    importance = None
    if cfg.weight_error is WeightError.OUTPUT:
        dims = [0, 2, 3] if x.dim() == 4 else [0]
        var = x.var(dims, unbiased=False)
        importance = (var.view(1, -1, 1, 1) if w.dim() == 4 else var.view(1, -1)).expand_as(w)
    return fake_quant(w, scale_for(weight_thresholds(w, spec, cfg.weight_grid, importance), spec), spec)


def _channel_means(layer, x) -> torch.Tensor:
    """Per-input-channel means of x (TinyNet: NCHW convs and (N, C) linears)."""
    return x.float().mean([0, 2, 3] if x.dim() == 4 else [0])


@pytest.mark.parametrize("weight_error", list(WeightError))
def test_sensitivity_equals_a_direct_run_with_one_layer_quantized(tiny_net, weight_error):
    # one batch: same statistics as below
    gm, cfg = _analyzed(tiny_net, weight_error, bit_options=(2, 4, 8), batch_size=8)
    x = torch.cat(CALIB)[:8]
    weights = interest_weights(gm, LossWeights.LFH, with_output=True)
    tapped = with_taps(gm, interest_nodes(gm))
    with torch.no_grad():
        zf = list(tapped(x))
    for node in mp.weight_layers(gm):
        layer = gm.get_submodule(node.target)
        for bits in (2, 4, 8):
            spec = q(node).wspec.with_bits(bits)

            def quantized(m, args, out, spec=spec):  # a whole-graph run with only this layer quantized
                wq = _weight_as_quantize_makes_it(m, args[0], spec, cfg)
                return mp.output_with(m, args[0], wq, _channel_means(m, args[0]))

            handle = layer.register_forward_hook(quantized)
            with torch.no_grad():
                zq = list(tapped(x))
            handle.remove()
            expected = float(distillation_loss(zf, zq, weights))
            assert sens(node)[bits] == pytest.approx(expected, rel=1e-5, abs=1e-9), (node.name, bits)


def test_a_rerun_keeps_only_what_it_is_asked_for(tiny_net):
    gm, _ = _analyzed(tiny_net, loss_weights="mean")
    x = torch.cat(CALIB)[:4]
    run = Downstream(gm, x)
    node = mp.weight_layers(gm)[0]
    below = run.below(node)
    value = run.float_env[node] * 1.5
    everything = run.rerun(node, value, below, 1, keep=set(below))
    tap = interest_nodes(gm)[-1]
    lean = run.rerun(node, value, below, 1, keep={tap})
    assert tap in lean and len(lean) < len(below) // 2  # intermediate values were dropped after their last use
    torch.testing.assert_close(lean[tap], everything[tap])


class FlattensBySize(nn.Module):
    """A head that reshapes with the batch size read off the input (x.view(x.size(0), -1)), as Lite0's does."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, stride=4), nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).view(x.size(0), -1))


@pytest.mark.parametrize("make", [TinyNet, FlattensBySize])
def test_stacked_candidates_equal_one_pass_each(make):
    torch.manual_seed(0)
    model = make().eval()
    gm, _ = _analyzed(model, stack_candidates=True)
    layers = mp.weight_layers(gm)
    assert gq(gm).mixed_precision.stacked_layers == len(layers)  # no layer fell back
    stacked = {n.name: dict(sens(n)) for n in layers}
    gm2, _ = _analyzed(model, stack_candidates=False)
    assert gq(gm2).mixed_precision.stacked_layers == 0
    for n in mp.weight_layers(gm2):
        for bits, value in sens(n).items():
            assert value == pytest.approx(stacked[n.name][bits], rel=1e-4, abs=1e-9)


def test_fewer_bits_are_more_sensitive(tiny_net):
    gm, _ = _analyzed(tiny_net, bit_options=(2, 4, 8))
    for n in mp.weight_layers(gm):
        s = sens(n)
        assert s[2] > s[4] > s[8] >= 0, (n.name, s)


def test_the_quantized_model_holds_the_chosen_bits_within_budget(tiny_net):
    cfg = PTQConfig(
        target=INT8.with_bits(4),
        mixed_precision=MixedPrecisionConfig(avg_bits=3.0, bit_options=(2, 4, 8), images=8, batch_size=8),
        lfh=LFH,
        progress=False,
    )
    qgm, report = fxq.quantize(tiny_net, CALIB, cfg)
    chosen = report.mixed_precision["bits"]
    layers = {n: m for n, m in qgm.named_modules() if isinstance(m, QuantWeight)}
    numel = sum(m.layer.weight.numel() for m in layers.values())
    bits = sum(m.spec.bits * m.layer.weight.numel() for m in layers.values())
    assert bits / numel <= 3.0 + 1e-9 and report.mixed_precision["avg_bits"] == pytest.approx(bits / numel)
    assert sorted({m.spec.bits for m in layers.values()}) == sorted(set(chosen.values()))
    assert {lr.node: lr.weight_bits for lr in report.layers if lr.weight_bits} == chosen


def test_a_model_with_one_layer():
    model = nn.Sequential(nn.Linear(6, 3)).eval()
    cfg = PTQConfig(
        mixed_precision=MixedPrecisionConfig(weight_memory=18 * 4 / 8, images=4, batch_size=4),
        lfh=LFH,
        progress=False,
    )
    qgm, report = fxq.quantize(model, [torch.randn(4, 6)], cfg)
    assert list(report.mixed_precision["bits"].values()) == [4]  # 18 weights, 9 bytes: 4 bits is the best fit
    assert report.mixed_precision["options"] == [2, 4, 8]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "needs a budget"),
        ({"avg_bits": -1.0}, "must be > 0"),
        ({"avg_bits": 4.0, "bit_options": (4,)}, "two or more widths"),
        ({"latency": 3.0}, "needs latency_table"),
        ({"act_avg_bits": 6.0}, "give act_bit_options too"),
        ({"avg_bits": 4.0, "act_bit_options": (8,)}, "act_bit_options must hold two or more widths"),
        ({"bops": 1e6, "act_bit_options": (4, 8)}, "BOPs budget with activation widths"),
    ],
)
def test_bad_mixed_precision_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MixedPrecisionConfig(**kwargs)


def test_an_infeasible_memory_budget_fails_before_quantizing(tiny_net):
    cfg = PTQConfig(
        mixed_precision=MixedPrecisionConfig(weight_memory=10.0, images=8, batch_size=8), lfh=LFH, progress=False
    )
    with pytest.raises(ConfigError, match="is infeasible; the smallest choice needs"):
        fxq.quantize(tiny_net, CALIB, cfg)


def test_copy_graph_decouples_the_quantization_state(tiny_net):
    from fxq.ir.graph import copy_graph
    from fxq.ir.meta import gq

    gm, _ = _analyzed(tiny_net)
    twin = copy_graph(gm)
    a = nodes_by_name(gm)
    for n in twin.graph.nodes:
        assert q(n) is not q(a[n.name]) and q(n).wspec == q(a[n.name]).wspec
        if q(n).fused_into is not None:
            assert q(n).fused_into in set(twin.graph.nodes)
    assert interest_nodes(twin) and all(n in set(twin.graph.nodes) for n in interest_nodes(twin))
    plan = gq(twin).mixed_precision.plan  # the plans' Nodes are the copy's
    assert plan is not None and set(plan.weight_bits) == set(mp.weight_layers(twin))
    before = q(mp.weight_layers(gm)[0]).wspec
    q(mp.weight_layers(twin)[0]).wspec = before.with_bits(2 if before.bits != 2 else 4)
    assert q(mp.weight_layers(gm)[0]).wspec == before  # a change to the copy stays in the copy


def test_plain_mean_sensitivity_needs_no_lfh(tiny_net):
    gm, _ = _analyzed(tiny_net, loss_weights="mean")
    assert all(q(n).lfh_weight is None for n in interest_nodes(gm))  # the LFH pass did not run
    for n in mp.weight_layers(gm):
        s = sens(n)
        assert s[2] > s[4] > s[8] >= 0
    lfh_gm, _ = _analyzed(tiny_net)
    mean_scores = [sens(n)[2] for n in mp.weight_layers(gm)]
    lfh_scores = [sens(n)[2] for n in mp.weight_layers(lfh_gm)]
    assert mean_scores != pytest.approx(lfh_scores)  # the weighting is used


def test_output_sensitivity_is_the_outputs_relative_error(tiny_net):
    gm, cfg = _analyzed(tiny_net, loss_weights="output", batch_size=8, images=8)
    assert all(q(n).lfh_weight is None for n in interest_nodes(gm))  # the LFH pass did not run
    x = torch.cat(CALIB)[:8]
    with torch.no_grad():
        ref = gm(x)
    for node in mp.weight_layers(gm):
        layer = gm.get_submodule(node.target)
        spec = q(node).wspec.with_bits(2)

        def quantized(m, args, out, spec=spec):
            wq = _weight_as_quantize_makes_it(m, args[0], spec, cfg)
            return mp.output_with(m, args[0], wq, _channel_means(m, args[0]))

        handle = layer.register_forward_hook(quantized)
        with torch.no_grad():
            out = gm(x)
        handle.remove()
        expected = float((out - ref).square().sum(1).mean() / ref.square().sum(1).mean())
        assert sens(node)[2] == pytest.approx(expected, rel=1e-5), node.name


def test_output_sensitivity_needs_a_single_tensor_output():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.head(self.conv(x))
            return y, y.mean()

    with pytest.raises(fxq.GraphCheckFailed, match="does not return one tensor; use 'lfh' or 'mean'"):
        _analyzed(TwoHeads().eval(), loss_weights="output")
    # the default adds the output measure only where the model returns class scores: here the mean alone
    gm, _ = _analyzed(TwoHeads().eval(), loss_weights="mean")
    assert gq(gm).mixed_precision.measures == ["mean"] and not gq(gm).mixed_precision.candidates


def test_by_default_the_output_measure_is_a_candidate_for_a_classifier(tiny_net):
    gm, _ = _analyzed(tiny_net, avg_bits=3.0, check_images=8)
    mixed = gq(gm).mixed_precision
    assert mixed.measures == ["lfh", "output"] and list(mixed.candidates) == ["lfh", "output"]
    assert mixed.selected in mixed.candidates
    off, _ = _analyzed(tiny_net, avg_bits=3.0, select_from=())
    assert gq(off).mixed_precision.measures == ["lfh"] and gq(off).mixed_precision.selected is None
    assert [sens(n) for n in mp.weight_layers(off)] == [sens(n) for n in mp.weight_layers(gm)]


def _act_mp_config(act_avg_bits: float) -> PTQConfig:
    mixed = MixedPrecisionConfig(
        avg_bits=8.0, act_bit_options=(4, 8), act_avg_bits=act_avg_bits, images=8, batch_size=8
    )
    return PTQConfig(target=INT8, mixed_precision=mixed, lfh=LFH, progress=False)


def test_activation_widths_are_chosen_within_their_budget(tiny_net):
    qgm, report = fxq.quantize(tiny_net, CALIB, _act_mp_config(6.0))
    chosen = report.mixed_precision["act_bits"]
    assert set(chosen.values()) == {4, 8}  # 6 bits on average forces a mix
    quantizers = {n: m for n, m in qgm.named_modules() if isinstance(m, ActQuant)}
    assert {name: quantizers[f"fxq_act_{name}"].spec.bits for name in chosen} == chosen
    numel = {}

    def record(module, args, out):  # values per image of each quantized activation
        numel[module] = out[0].numel()

    hooks = [m.register_forward_hook(record) for m in quantizers.values()]
    qgm(seeded(1, 3, 16, 16))
    for h in hooks:
        h.remove()
    bits = sum(numel[m] * m.spec.bits for m in quantizers.values()) / sum(numel.values())
    assert bits <= 6.0 + 1e-9 and report.mixed_precision["act_avg_bits"] == pytest.approx(bits)
    assert {lr.node: lr.act_bits for lr in report.layers if lr.node in chosen} == chosen


def test_fewer_activation_bits_are_more_sensitive(tiny_net):
    gm = fxq.analyze(tiny_net, CALIB, _act_mp_config(6.0))
    sites = mp.activation_sites(gm)
    assert len(sites) >= 5
    for n in sites:
        s = act_sens(n)
        assert s[4] > s[8] >= 0, (n.name, s)


def test_an_infeasible_activation_budget_names_the_smallest_one(tiny_net):
    with pytest.raises(ConfigError, match=r"activation bytes per image \(3.0 bits/value\) budget .* is infeasible"):
        fxq.quantize(tiny_net, CALIB, _act_mp_config(3.0))


def test_the_allocation_with_the_best_label_free_agreement_is_kept(tiny_net):
    gm, cfg = _analyzed(tiny_net, avg_bits=3.0, select_from=("output", "mean"), check_images=8)
    mixed = gq(gm).mixed_precision
    assert list(mixed.candidates) == ["lfh", "output", "mean"]
    scores = mixed.agreement
    assert mixed.selected == max(scores, key=scores.__getitem__) and mixed.check_images == 8
    chosen = mixed.candidates[mixed.selected].weight_bits
    assert {n: q(n).wspec.bits for n in mp.weight_layers(gm)} == chosen and mixed.plan.weight_bits == chosen
    # the recorded score is the agreement of that allocation's RTN model, rebuilt here through the public API
    x = torch.cat(CALIB)[-8:]
    qgm, _ = fxq.quantize_analyzed(copy_graph(gm), CALIB, cfg)
    with torch.no_grad():
        same = (qgm(x).argmax(1) == tiny_net(x).argmax(1)).float().mean() * 100
    assert scores[mixed.selected] == pytest.approx(float(same))
    # every measure's sensitivities come from the same re-runs as a single-measure analysis
    alone, _ = _analyzed(tiny_net, avg_bits=3.0, loss_weights="output")
    for a, b in zip(mp.weight_layers(gm), mp.weight_layers(alone)):
        assert sens(a, "output") == pytest.approx(sens(b), rel=1e-5)
        assert sens(a, "lfh") == sens(a)


@pytest.fixture
def calibrations(monkeypatch) -> list:
    """One entry per Calibrate pass run while the test lasts."""
    runs = []
    calibrate = Calibrate.call
    monkeypatch.setattr(Calibrate, "call", lambda self, gm: runs.append(1) or calibrate(self, gm))
    return runs


def test_one_calibration_serves_the_choice_and_the_final_model(tiny_net, calibrations):
    cfg = PTQConfig(
        target=INT8.with_bits(4),
        mixed_precision=MixedPrecisionConfig(avg_bits=3.0, images=8, batch_size=4, check_images=8),
        lfh=LFH,
        progress=False,
    )
    _, report = fxq.quantize(tiny_net, CALIB, cfg)
    assert report.mixed_precision["selected"] in ("lfh", "output") and len(calibrations) == 1
    assert report.calib_images == sum(len(x) for x in CALIB)  # counted once, not once per use


def test_a_convert_needing_layer_input_statistics_calibrates_again(tiny_net, calibrations):
    mixed = MixedPrecisionConfig(avg_bits=3.0, images=8, batch_size=4, select_from=())
    plain = PTQConfig(target=INT8.with_bits(4), mixed_precision=mixed, lfh=LFH, bias_correction=False, progress=False)
    gm = fxq.analyze(tiny_net, CALIB, plain)
    assert is_calibrated(gm) and not is_calibrated(gm, input_stats=True) and len(calibrations) == 1
    corrected = dataclasses.replace(plain, bias_correction=True)
    qgm, report = fxq.quantize_analyzed(copy_graph(gm), CALIB, corrected)
    assert len(calibrations) == 2 and report.calib_images == sum(len(x) for x in CALIB)
    fresh, _ = fxq.quantize_analyzed(float_graph(gm), CALIB, corrected)  # same widths, calibrated from scratch
    x = torch.cat(CALIB)
    with torch.no_grad():
        assert torch.equal(qgm(x), fresh(x))
        assert not torch.equal(qgm(x), fxq.quantize_analyzed(copy_graph(gm), CALIB, plain)[0](x))


def test_the_choice_needs_a_calibrated_graph(tiny_net):
    gm, cfg = _analyzed(tiny_net, avg_bits=3.0, select_from=("output",), check_images=8)
    plain = float_graph(gm)  # same sensitivities and candidates, observers out
    assert gq(plain).mixed_precision.candidates
    with pytest.raises(GraphCheckFailed, match="not calibrated; run Observe and Calibrate first"):
        run_passes(plain, passes(cfg, CALIB, stages=(Stage.ALLOCATE,)))


def test_select_from_settings():
    cfg = MixedPrecisionConfig(avg_bits=4, select_from="output")
    assert cfg.select_from == (LossWeights.OUTPUT,) and cfg.measures == (LossWeights.LFH, LossWeights.OUTPUT)
    assert MixedPrecisionConfig(avg_bits=4, select_from=("lfh", "mean", "mean")).select_from == (LossWeights.MEAN,)
    assert MixedPrecisionConfig(avg_bits=4).select_from is None  # automatic: decided on the graph
    assert MixedPrecisionConfig(avg_bits=4).measures == (LossWeights.LFH,)
    with pytest.raises(ConfigError, match="select_from must hold measures from"):
        MixedPrecisionConfig(avg_bits=4, select_from=("hessian",))
    with pytest.raises(ConfigError, match="check_images must be >= 1"):
        MixedPrecisionConfig(avg_bits=4, check_images=0)


def test_measure_fields_read_a_written_list():
    assert measure_fields("auto") == {} and measure_fields(None) == {}
    both = MixedPrecisionConfig(avg_bits=4, **measure_fields("output, lfh"))
    assert both.measures == (LossWeights.OUTPUT, LossWeights.LFH)
    assert measure_fields("lfh+mean") == measure_fields("lfh,mean")
    assert MixedPrecisionConfig(avg_bits=4, **measure_fields("mean")).select_from == ()  # one measure: no choice
    assert measure_fields("lfh,") == measure_fields("lfh")  # a trailing comma is harmless
    for bad in ("hessian", "lfh,hessian", " , "):
        with pytest.raises(ConfigError, match="unknown measure"):
            measure_fields(bad)


@pytest.mark.parametrize("n", [1, 5, 7, 12, 40])
def test_last_images_are_the_tail_of_uneven_batches(n):
    from fxq.mp.select import last_images

    batches = [torch.full((k, 1), float(i)) for i, k in enumerate([3, 4, 2, 5])]
    assert torch.equal(last_images(iter(batches), n), torch.cat(batches)[-n:])
    with pytest.raises(fxq.DataError, match="no batches given"):
        last_images([], 4)
