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

from fxq.ir.graph import call_sites
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
    would not fit `bits` bits (a channel whose weights are all near zero has a vanishing step), or a layer
    called at several sites whose inputs are on different grids; either way node.meta["fxq"].bias_bits stays
    None and the backends keep that bias float too."""
    changed = False
    limit = 2 ** (bits - 1) - 1
    for target, nodes in call_sites(gm).items():
        qw = gm.get_submodule(target)
        if not isinstance(qw, QuantWeight) or qw.layer.bias is None or qw.soft_codes is not None:
            continue
        sources = [grid_source(gm, n.args[0], ActQuant) if isinstance(n.args[0], Node) else None for n in nodes]
        if any(src is None for src in sources):
            continue
        steps = [gm.get_submodule(src.target).scale.float() for src in sources]
        if any(not torch.equal(steps[0], t) for t in steps[1:]):  # one bias cannot sit on two sites' grids
            continue
        bias = qw.layer.bias
        step = bias_step(gm.get_submodule(sources[0].target), qw).to(bias.device)
        codes = torch.round(bias.detach().float() / step)
        if not bool(torch.all(codes.abs() <= limit)):
            continue
        with torch.no_grad():
            bias.copy_((codes * step).to(bias.dtype))
        for node in nodes:
            q(node).bias_bits = bits
        changed = True
    return changed
