"""Observers become fake-quantizers: the thresholds fitted to what calibration saw, the modules that hold them.

Weights: symmetric, per output channel, threshold by squared-error search (MCT's convention) at the width of
the node's weight spec; the error is the weight's own, or with WeightError.OUTPUT each weight's error weighted by
the spread of the input channel it multiplies. Activations: per tensor, threshold by MSE over the calibration
histogram or the observed min/max; unsigned when the op or the data is non-negative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from fxq.errors import GraphCheckFailed
from fxq.ir.graph import call_sites
from fxq.ir.meta import OpKind, gq, q
from fxq.quant.modules import ActObserver, ActQuant, ChannelStatsObserver, QuantWeight
from fxq.quant.qmath import ActThreshold, QSpec, WeightError, activation_threshold, input_importance, weight_thresholds

__all__ = [
    "ConvertSettings",
    "convert_",
    "rebuild_quantizers_",
    "fit_activation",
    "fit_weight",
    "input_energy",
    "is_calibrated",
]


@dataclass(frozen=True)
class ConvertSettings:
    """How Quantize fits thresholds (the PTQConfig fields it reads)."""

    act_threshold: ActThreshold = ActThreshold.MSE
    weight_grid: int = 64  # threshold candidates per weight channel
    weight_error: WeightError = WeightError.MSE
    bias_correction: bool = True


def fit_activation(obs: ActObserver, aspec: QSpec, method: ActThreshold) -> tuple[QSpec, float]:
    """(spec, threshold) of the quantizer for what `obs` saw: unsigned, one more bit, when nothing was negative."""
    lo, hi = float(obs.lo), float(obs.hi)
    spec = replace(aspec, signed=aspec.signed and lo < 0)
    return spec, activation_threshold(lo, hi, obs.sample(), spec, method)


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


def is_calibrated(gm: GraphModule, input_stats: bool = False) -> bool:
    """Whether gm holds observers that calibration has run (with `input_stats`: layer-input statistics among them).
    What they record does not depend on the widths, so a graph calibrated once serves every bit allocation
    (and the final convert) that follows."""
    kinds = {type(gm.get_submodule(n.target)) for n in gm.graph.nodes if q(n).kind is OpKind.OBSERVER}
    return gq(gm).calib_images > 0 and bool(kinds) and (not input_stats or ChannelStatsObserver in kinds)


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
    m.aspec, threshold = fit_activation(obs, m.aspec, method)
    m.act_range = (lo, hi)
    gm.add_submodule(obs_node.target, ActQuant(m.aspec, threshold))
    q(obs_node).kind = OpKind.ACT_QUANT


def _quantize_weight(gm: GraphModule, sites: list[Node], s: ConvertSettings) -> None:
    """One weight quantizer for a layer and every site that calls it: the threshold and the bias correction from
    the input statistics of all its sites together (a shared layer is one tensor on the device)."""
    node = sites[0]
    spec = q(node).wspec
    if any(q(n).wspec != spec for n in sites[1:]):
        raise GraphCheckFailed(
            f"quantize: module '{node.target}' is called at {len(sites)} sites with different weight widths "
            f"({sorted({q(n).wspec.bits for n in sites})} bits); one tensor takes one width"
        )
    layer = gm.get_submodule(node.target)
    observers = []
    for site in sites:
        src = site.args[0]
        obs = gm.get_submodule(src.target) if isinstance(src, Node) and src.op == "call_module" else None
        if isinstance(obs, ChannelStatsObserver):
            observers.append((site, src, obs))
    mean = second = None
    if observers:
        mean, second = ChannelStatsObserver.pooled([obs for _, _, obs in observers])
    energy = (
        input_energy(mean, second, s.bias_correction) if s.weight_error is WeightError.OUTPUT and observers else None
    )
    qw = QuantWeight(layer, spec, fit_weight(layer, spec, s.weight_grid, energy))
    if observers and s.bias_correction:
        qw.correct_bias_(mean)
    for site, src, _ in observers:
        site.replace_input_with(src, src.args[0])
        gm.graph.erase_node(src)
    gm.add_submodule(node.target, qw)


def convert_(gm: GraphModule, settings: ConvertSettings) -> GraphModule:
    """Replace observers and float layers by fake-quant modules, in place (reference numerics, CPU and GPU)."""
    sites = call_sites(gm)
    for node in list(gm.graph.nodes):
        if q(node).kind is OpKind.OBSERVER and isinstance(gm.get_submodule(node.target), ActObserver):
            _quantize_activation(gm, node, settings.act_threshold)
        elif q(node).wspec is not None and not isinstance(gm.get_submodule(node.target), QuantWeight):
            _quantize_weight(gm, sites[node.target], settings)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def rebuild_quantizers_(gm: GraphModule) -> GraphModule:
    """The modules `convert_` puts in, at every observer and weighted layer, from the nodes' specs, with placeholder
    steps: the structure of a quantized graph without calibration, for a saved model's tensors to fill."""
    for node in list(gm.graph.nodes):
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        if q(node).kind is OpKind.OBSERVER and isinstance(mod, ActObserver):
            gm.add_submodule(node.target, ActQuant(q(q(node).observes).aspec, 1.0))
            q(node).kind = OpKind.ACT_QUANT
        elif q(node).wspec is not None and isinstance(mod, nn.Module) and not isinstance(mod, QuantWeight):
            steps = torch.ones(mod.weight.shape[0] if q(node).wspec.per_channel else ())
            gm.add_submodule(node.target, QuantWeight(mod, q(node).wspec, steps))
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
