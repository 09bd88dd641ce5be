"""Quantize: observers become activation fake-quantizers, conv/linear modules become QuantWeight.

Weights: symmetric, per output channel, threshold by squared-error search (METHOD.md section 2), at the
node's chosen bits (NodeQ.bits; mixed precision may have set it); the error is the weight's own, or with
WeightError.OUTPUT each weight's error weighted by the spread of the input channel it multiplies. Activations: per tensor, threshold by
MSE over the calibration histogram or the observed min/max; unsigned when the op or the data is non-negative.
"""

from __future__ import annotations

import math
from dataclasses import replace

from torch import Tensor, nn
from torch.fx import GraphModule, Node

from fxq.errors import GraphCheckFailed
from fxq.meta import OpKind, q
from fxq.modules import ActObserver, ActQuant, ChannelStatsObserver, QuantWeight
from fxq.passbase import FxqPass, PassResult
from fxq.qmath import ActThreshold, QSpec, WeightError, activation_threshold, input_importance, weight_thresholds

__all__ = ["Quantize", "fit_activation", "fit_weight"]


def fit_activation(obs: ActObserver, aspec: QSpec, method: ActThreshold) -> tuple[QSpec, float]:
    """(spec, threshold) of the quantizer for what `obs` saw: unsigned, one more bit, when nothing was negative."""
    lo, hi = float(obs.lo), float(obs.hi)
    spec = replace(aspec, signed=aspec.signed and lo < 0)
    return spec, activation_threshold(lo, hi, obs.sample(), spec, method)


def _quantize_activation(gm: GraphModule, obs_node: Node, method: ActThreshold) -> None:
    src = q(obs_node).observes
    obs: ActObserver = gm.get_submodule(obs_node.target)
    if not obs.observed:
        raise GraphCheckFailed(
            f"quantize: calibration never reached {src.format_node()}; run Calibrate on data "
            f"that exercises every branch of the model"
        )
    lo, hi = float(obs.lo), float(obs.hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise GraphCheckFailed(
            f"quantize: calibration saw NaN/inf at {src.format_node()} (range {lo}..{hi}); "
            f"check the input normalisation and the model weights"
        )
    m = q(src)
    m.aspec, m.act_threshold = fit_activation(obs, m.aspec, method)
    m.act_range = (lo, hi)
    gm.add_submodule(obs_node.target, ActQuant(m.aspec, m.act_threshold))
    q(obs_node).kind = OpKind.ACT_QUANT


def fit_weight(layer: nn.Module, spec: QSpec, n_grid: int, channel_energy: Tensor | None = None) -> Tensor:
    """Per-channel thresholds of `layer`'s weight at `spec`: plain MSE, or each weight's error weighted by
    `channel_energy`, its input channel's variance or second moment (see `input_energy`)."""
    w = layer.weight.detach()
    importance = None
    if channel_energy is not None:
        importance = input_importance(w.shape, getattr(layer, "groups", 1), channel_energy.to(w.device))
    return weight_thresholds(w, spec, n_grid, importance)


def input_energy(mean: Tensor, second_moment: Tensor, bias_correction: bool) -> Tensor:
    """What one input channel's weights weigh in the layer's output error: its variance when bias correction
    cancels the mean shift, its second moment when nothing does."""
    return (second_moment - mean.square()).clamp_min(0) if bias_correction else second_moment


def _quantize_weight(
    gm: GraphModule, node: Node, n_grid: int, weight_error: WeightError, bias_correction: bool
) -> None:
    m = q(node)
    spec = m.wspec.with_bits(m.bits or m.wspec.bits)
    layer = gm.get_submodule(node.target)
    src = node.args[0]
    stats = gm.get_submodule(src.target) if isinstance(src, Node) and src.op == "call_module" else None
    stats = stats if isinstance(stats, ChannelStatsObserver) else None
    energy = None
    if weight_error is WeightError.OUTPUT and stats is not None:
        energy = input_energy(stats.mean(), stats.second_moment(), bias_correction)
    m.w_threshold = fit_weight(layer, spec, n_grid, energy)
    m.wspec = spec
    qw = QuantWeight(layer, spec, m.w_threshold)
    if stats is not None:
        if bias_correction:
            qw.correct_bias_(stats.mean())
        node.replace_input_with(src, src.args[0])
        gm.graph.erase_node(src)
    gm.add_submodule(node.target, qw)


class Quantize(FxqPass):
    """Replace observers and float layers by fake-quant modules (reference numerics, CPU and GPU)."""

    def __init__(
        self,
        act_threshold: ActThreshold = ActThreshold.MSE,
        weight_grid: int = 64,
        weight_error: WeightError = WeightError.MSE,
        bias_correction: bool = True,
    ):
        self.act_threshold = act_threshold
        self.weight_grid = weight_grid
        self.weight_error, self.bias_correction = weight_error, bias_correction

    def requires(self, gm: GraphModule) -> None:
        if not any(q(n).kind is OpKind.OBSERVER for n in gm.graph.nodes):
            raise GraphCheckFailed("quantize: no observers in the graph; run Observe and Calibrate first")

    def call(self, gm: GraphModule) -> PassResult:
        for node in list(gm.graph.nodes):
            if q(node).kind is OpKind.OBSERVER and isinstance(gm.get_submodule(node.target), ActObserver):
                _quantize_activation(gm, node, self.act_threshold)
            elif q(node).wspec is not None and not isinstance(gm.get_submodule(node.target), QuantWeight):
                _quantize_weight(gm, node, self.weight_grid, self.weight_error, self.bias_correction)
        gm.delete_all_unused_submodules()
        gm.recompile()
        return PassResult(gm, modified=True)

    def ensures(self, gm: GraphModule) -> None:
        left = [n for n in gm.graph.nodes if q(n).kind is OpKind.OBSERVER]
        if left:
            raise GraphCheckFailed(f"quantize: observer left in the graph at {left[0].format_node()}")
