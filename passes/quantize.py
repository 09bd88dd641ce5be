"""Quantize: observers become activation fake-quantizers, conv/linear modules become QuantWeight
(fxq.quant.convert holds the thresholds' fit)."""

from __future__ import annotations

from torch.fx import GraphModule

from fxq.errors import GraphCheckFailed
from fxq.ir.meta import OpKind, q
from fxq.ir.passbase import FxqPass, PassResult
from fxq.quant.convert import ConvertSettings, convert_

__all__ = ["Quantize"]


class Quantize(FxqPass):
    """Replace observers and float layers by fake-quant modules (reference numerics, CPU and GPU)."""

    def __init__(self, settings: ConvertSettings = ConvertSettings()):
        self.settings = settings

    def requires(self, gm: GraphModule) -> None:
        if not any(q(n).kind is OpKind.OBSERVER for n in gm.graph.nodes):
            raise GraphCheckFailed("quantize: no observers in the graph; run Observe and Calibrate first")

    def call(self, gm: GraphModule) -> PassResult:
        return PassResult(convert_(gm, self.settings), modified=True)

    def ensures(self, gm: GraphModule) -> None:
        left = [n for n in gm.graph.nodes if q(n).kind is OpKind.OBSERVER]
        if left:
            raise GraphCheckFailed(f"quantize: observer left in the graph at {left[0].format_node()}")
