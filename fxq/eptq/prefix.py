"""A frozen prefix: the first layers of the graph kept at their layer-local rounding, so that the whole-network
steps start from the quantized graph's value where those layers end, computed once per image, instead of from the
images. A step then skips their forward and backward. In a CNN the first layers hold a small share of the weights
and a large share of a step's work: theirs are the largest feature maps.

The loss terms of the interest tensors inside the prefix are constants once its layers are frozen, so the steps
leave them out; the gradients are those of the whole-network loss with the prefix frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from fxq.eptq.layerwise import supports
from fxq.ir.graph import call_sites, cuts
from fxq.ir.taps import interest_nodes, quantized_value, up_to
from fxq.quant.modules import QuantWeight

__all__ = ["Prefix", "frozen_prefix", "values_at"]


@dataclass
class Prefix:
    """The layers before `cut` (frozen) and the interest tensors past it (still in the loss, by their index among
    the graph's interest tensors)."""

    cut: Node
    layers: list[QuantWeight]
    kept: list[int]
    weight_share: float  # of the quantized weights, the prefix's


def frozen_prefix(gm: GraphModule, share: float) -> Prefix | None:
    """The longest prefix of `gm` that ends at a cut (fxq.ir.graph.cuts), holds at most `share` of the quantized
    weights, and has only layers the layer-local rounding supports, each called before the cut alone; at least one
    layer in it and something past it to distil: an interest tensor, or the output when it is one tensor. None when
    there is none."""
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    sites = {
        target: [index[n] for n in ns]
        for target, ns in call_sites(gm).items()
        if isinstance(gm.get_submodule(target), QuantWeight)
    }
    layers = {target: gm.get_submodule(target) for target in sites}
    total = sum(qw.layer.weight.numel() for qw in layers.values())
    z = [index[quantized_value(n)] for n in interest_nodes(gm)]
    one_output = isinstance(nodes[-1].args[0], Node)  # the loss then has the output too
    best = None
    for cut in cuts(gm):
        at = index[cut]
        before = [t for t, where in sites.items() if where[0] <= at]
        if any(max(sites[t]) > at or not supports(layers[t].layer) for t in before):
            continue  # a layer also called past the cut, or one the layer-local rounding does not choose for
        weights = sum(layers[t].layer.weight.numel() for t in before)
        kept = [k for k, i in enumerate(z) if i > at]
        if weights > share * total:
            break  # later cuts hold more
        if before and (kept or one_output):
            best = Prefix(cut, [layers[t] for t in before], kept, weights / total)
    return best


@torch.no_grad()
def values_at(gm: GraphModule, cut: Node, images: Tensor, batch: int, prepare) -> Tensor:
    """The value of `cut` for every image (float32, where the graph computes), from batches of `batch` images made
    ready for the graph by `prepare` (its memory format)."""
    head = up_to(gm, cut)
    out = None
    for start in range(0, len(images), batch):
        v = head(prepare(images[start : start + batch]))
        if out is None:
            out = torch.empty((len(images), *v.shape[1:]), dtype=torch.float32, device=v.device)
            if v.dim() == 4 and v.is_contiguous(memory_format=torch.channels_last):
                out = out.contiguous(memory_format=torch.channels_last)
        out[start : start + len(v)].copy_(v)
    return out
