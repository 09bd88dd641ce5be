"""Biases on the integer grid the device adds them on.

Integer kernels accumulate x_codes * w_codes in int32 and add the bias as an int32 on the same scale,
s_x * s_w per output channel (ONNX QLinearConv, TFLite, oneDNN u8s8). A float bias in the reference differs from
that by up to half a step per channel: tiny, but systematic. Every output of the channel moves the same way, the
output quantizers flip a few codes, and the disagreement compounds through the network. With the bias on that
grid the reference computes what the device computes.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from fxq.ir.meta import q
from fxq.ir.ops import grid_source
from fxq.quant.modules import ActQuant, QuantWeight

__all__ = ["bias_step", "quantize_biases_"]


def bias_step(input_quant: ActQuant, weight_quant: QuantWeight) -> torch.Tensor:
    """s_x * s_w per output channel, in float32 as integer runtimes compute it."""
    return input_quant.scale.float() * weight_quant.scale.float()


def quantize_biases_(gm: GraphModule, bits: int) -> bool:
    """Round each quantized conv/linear bias to `bits`-bit integers at step s_x * s_w, in place; returns whether
    any changed.

    Layers whose input is not on an activation grid keep a float bias, and so does a layer where the integer
    would not fit `bits` bits (a channel whose weights are all near zero has a vanishing step); either way
    node.meta["fxq"].bias_bits stays None and the backends keep that bias float too."""
    changed = False
    limit = 2 ** (bits - 1) - 1
    for node in gm.graph.nodes:
        qw = gm.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(qw, QuantWeight) or qw.layer.bias is None or qw.soft_codes is not None:
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
        q(node).bias_bits = bits
        changed = True
    return changed
