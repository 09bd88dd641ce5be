"""Quantize: observers become activation fake-quantizers, conv/linear modules become QuantWeight.

Weights: symmetric, per output channel, threshold by squared-error search (METHOD.md section 2), at the
node's chosen bits (NodeQ.bits; mixed precision may have set it). Activations: per tensor, threshold by
MSE over the calibration histogram or the observed min/max; unsigned when the op or the data is non-negative.
"""

from __future__ import annotations

import math
from dataclasses import replace

from torch.fx import GraphModule, Node

from fxq.errors import GraphCheckFailed
from fxq.meta import OpKind, q
from fxq.modules import ActObserver, ActQuant, ChannelMeanObserver, QuantWeight
from fxq.passbase import FxqPass, PassResult
from fxq.qmath import ActThreshold, QSpec, activation_threshold, weight_thresholds

__all__ = ["Quantize", "fit_activation"]


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


def _quantize_weight(gm: GraphModule, node: Node, n_grid: int) -> None:
    m = q(node)
    spec = m.wspec.with_bits(m.bits or m.wspec.bits)
    layer = gm.get_submodule(node.target)
    m.w_threshold = weight_thresholds(layer.weight.detach(), spec, n_grid)
    m.wspec = spec
    qw = QuantWeight(layer, spec, m.w_threshold)
    src = node.args[0]
    if isinstance(src, Node) and isinstance(
        gm.get_submodule(src.target) if src.op == "call_module" else None, ChannelMeanObserver
    ):
        qw.correct_bias_(gm.get_submodule(src.target).mean())
        node.replace_input_with(src, src.args[0])
        gm.graph.erase_node(src)
    gm.add_submodule(node.target, qw)


class Quantize(FxqPass):
    """Replace observers and float layers by fake-quant modules (reference numerics, CPU and GPU)."""

    def __init__(self, act_threshold: ActThreshold = ActThreshold.MSE, weight_grid: int = 64):
        self.act_threshold = act_threshold
        self.weight_grid = weight_grid

    def requires(self, gm: GraphModule) -> None:
        if not any(q(n).kind is OpKind.OBSERVER for n in gm.graph.nodes):
            raise GraphCheckFailed("quantize: no observers in the graph; run Observe and Calibrate first")

    def call(self, gm: GraphModule) -> PassResult:
        for node in list(gm.graph.nodes):
            if q(node).kind is OpKind.OBSERVER and isinstance(gm.get_submodule(node.target), ActObserver):
                _quantize_activation(gm, node, self.act_threshold)
            elif q(node).wspec is not None and not isinstance(gm.get_submodule(node.target), QuantWeight):
                _quantize_weight(gm, node, self.weight_grid)
        gm.delete_all_unused_submodules()
        gm.recompile()
        return PassResult(gm, modified=True)

    def ensures(self, gm: GraphModule) -> None:
        left = [n for n in gm.graph.nodes if q(n).kind is OpKind.OBSERVER]
        if left:
            raise GraphCheckFailed(f"quantize: observer left in the graph at {left[0].format_node()}")
