"""One lowering for every backend: the integer codes, steps and zero points a backend ships, read from the
fake-quant modules that own them.

Weights: the module's hard codes (`QuantWeight.hard_codes`) as int8, one step per output channel, zero point 0.
Activations: a signed grid [-2^(b-1), 2^(b-1) - 1] ships as uint8 with zero point 2^(b-1), an unsigned one as
uint8 with zero point 0 (the same values; x86 integer kernels take u8 activations with s8 weights).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from fxq.errors import ConfigError, UnsupportedOp
from fxq.ir.graph import without_graph_state
from fxq.ir.meta import q
from fxq.ir.ops import grid_source, is_depthwise
from fxq.quant.modules import ActQuant, QuantWeight

__all__ = [
    "LoweredWeight",
    "LoweredActivation",
    "lower_weight",
    "lower_activation",
    "lowered_copy",
    "max_dense_grid_bits",
]


@dataclass(frozen=True)
class LoweredWeight:
    """A conv/linear weight as integers: codes * scale[channel] is the reference's weight."""

    layer: nn.Module  # the float conv/linear: its op, and the bias (on the int32 grid after QuantizeBias)
    codes: Tensor  # int8, the weight's shape
    scale: Tensor  # float32, one per output channel
    bits: int  # the width it is stored at
    grid_bits: int  # the width of its grid (narrower where the target's ISA caps it)
    depthwise: bool
    bias_codes: Tensor | None = None  # int32 codes of the bias, where QuantizeBias put it on the grid s_x * s_w
    bias_scale: Tensor | None = None  # that grid's step per output channel (float32, as integer runtimes compute it)


@dataclass(frozen=True)
class LoweredActivation:
    """An activation quantizer as a uint8 grid: code = clamp(round(x / scale) + zero_point, 0, quant_max)."""

    scale: float
    zero_point: int
    quant_max: int
    bits: int


def lower_weight(name: str, qw: QuantWeight, input_scale: Tensor | None = None) -> LoweredWeight:
    """`qw` as integers; with the step of the activation grid its input is on, its bias as int32 codes too (when
    QuantizeBias put it there: codes * step is then exactly the reference's bias)."""
    if not qw.spec.per_channel:
        raise UnsupportedOp(
            f"lowering: per-tensor weight quantizer at '{name}' is not supported; quantize with a per-channel target"
        )
    if qw.soft_codes is not None:
        raise ConfigError(f"lowering: the rounding optimization is still running on '{name}' (harden it first)")
    scale = qw.scale.detach().float()
    bias = qw.layer.bias
    bias_codes = bias_scale = None
    if input_scale is not None and bias is not None:
        bias_scale = input_scale.float() * scale
        bias_codes = torch.round(bias.detach().float() / bias_scale).to(torch.int32)
    return LoweredWeight(
        layer=qw.layer,
        codes=qw.hard_codes().to(torch.int8),
        scale=scale,
        bits=qw.spec.bits,
        grid_bits=qw.spec.grid_bits,
        depthwise=is_depthwise(qw.layer),
        bias_codes=bias_codes,
        bias_scale=bias_scale,
    )


def lower_activation(aq: ActQuant) -> LoweredActivation:
    zero = -aq.spec.qmin  # 2^(b-1) for a signed grid, 0 for an unsigned one
    return LoweredActivation(float(aq.scale), zero, aq.spec.qmax - aq.spec.qmin, aq.spec.bits)


def lowered_copy(
    qgm: GraphModule,
    weight: Callable[[str, LoweredWeight], nn.Module],
    activation: Callable[[str, LoweredActivation], nn.Module | None],
) -> GraphModule:
    """A copy of `qgm` whose quantizers are the backend's modules built from their lowered form (`activation`
    may return None to keep a quantizer as it is). `qgm` is left unchanged."""
    grids = {n.target: _bias_grid(qgm, n) for n in qgm.graph.nodes if isinstance(_module(qgm, n), QuantWeight)}
    with without_graph_state(qgm):
        gm = copy.deepcopy(qgm)
    for node in list(gm.graph.nodes):
        mod = _module(gm, node)
        if isinstance(mod, QuantWeight):
            gm.add_submodule(node.target, weight(node.target, lower_weight(node.target, mod, grids[node.target])))
        elif isinstance(mod, ActQuant):
            new = activation(node.target, lower_activation(mod))
            if new is not None:
                gm.add_submodule(node.target, new)
    return gm


def _module(gm: GraphModule, node: Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _bias_grid(qgm: GraphModule, node: Node) -> Tensor | None:
    """The input step of a weighted layer whose bias QuantizeBias put on the integer grid (else None)."""
    x = node.args[0]
    if q(node).bias_bits is None or not isinstance(x, Node):
        return None
    src = grid_source(qgm, x, ActQuant)
    return None if src is None else qgm.get_submodule(src.target).scale.detach()


def max_dense_grid_bits(qgm: nn.Module) -> int:
    """The widest weight grid among layers that sum over input channels: what an ISA must compute exactly."""
    grids = [m.spec.grid_bits for m in qgm.modules() if isinstance(m, QuantWeight) and not is_depthwise(m.layer)]
    return max(grids, default=0)
