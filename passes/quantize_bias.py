"""QuantizeBias: every quantized layer's bias on the integer grid the device adds it on (fxq.quant.bias).

Runs last: after RTN, or after the rounding optimization, which trains the biases in float.
"""

from __future__ import annotations

from torch.fx import GraphModule

from fxq.ir.passbase import FxqPass, PassResult
from fxq.quant.bias import quantize_biases_

__all__ = ["QuantizeBias"]


class QuantizeBias(FxqPass):
    """Round each quantized conv/linear bias to `bits`-bit integers at step s_x * s_w (in place)."""

    def __init__(self, bits: int = 32):
        self.bits = bits

    def call(self, gm: GraphModule) -> PassResult:
        return PassResult(gm, quantize_biases_(gm, self.bits))
