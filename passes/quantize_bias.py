"""QuantizeBias: every quantized layer's bias on the integer grid the device adds it on.

Integer kernels accumulate x_codes * w_codes in int32 and add the bias as an int32 on the same scale,
s_x * s_w per output channel (ONNX QLinearConv, TFLite, oneDNN u8s8). A float bias in the reference differs from
that by up to half a step per channel, which is tiny (1e-5 relative on ResNet-20) but systematic: every
output of the channel moves the same way, the output quantizers flip a few codes, and the disagreement compounds
through the network (0.8 % of the CIFAR-10 test images changed their top-1 class under ONNX Runtime before this
pass). With the bias on that grid the reference computes what the device computes.

Runs last: after RTN, or after the rounding optimization, which trains the biases in float.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from fxq.meta import q
from fxq.modules import ActQuant, QuantWeight
from fxq.ops import grid_source
from fxq.passbase import FxqPass, PassResult

__all__ = ["QuantizeBias", "bias_step"]


def bias_step(input_quant: ActQuant, weight_quant: QuantWeight) -> torch.Tensor:
    """s_x * s_w per output channel, in float32 as integer runtimes compute it."""
    return input_quant.scale.float() * weight_quant.scale.float()


class QuantizeBias(FxqPass):
    """Round each quantized conv/linear bias to `bits`-bit integers at step s_x * s_w (in place).

    Layers whose input is not on an activation grid keep a float bias, and so does a layer where the integer
    would not fit `bits` bits (a channel whose weights are all near zero has a vanishing step); either way
    node.meta["fxq"].bias_bits stays None and the backends keep that bias float too."""

    def __init__(self, bits: int = 32):
        self.bits = bits

    def call(self, gm: GraphModule) -> PassResult:
        changed = False
        limit = 2 ** (self.bits - 1) - 1
        for node in gm.graph.nodes:
            qw = gm.get_submodule(node.target) if node.op == "call_module" else None
            if not isinstance(qw, QuantWeight) or qw.layer.bias is None or qw.soft_rounding is not None:
                continue
            x = node.args[0]
            source = grid_source(gm, x, ActQuant) if isinstance(x, Node) else None
            if source is None:
                continue
            bias = qw.layer.bias
            step = bias_step(gm.get_submodule(source.target), qw).to(bias.device)
            codes = torch.round(bias.detach().float() / step)
            if not bool(torch.all(codes.abs() <= limit)):
                continue
            with torch.no_grad():
                bias.copy_((codes * step).to(bias.dtype))
            q(node).bias_bits = self.bits
            changed = True
        return PassResult(gm, changed)
