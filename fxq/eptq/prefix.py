"""A frozen prefix: the first layers of the graph kept at their layer-local rounding, so that the whole-network
steps start from the quantized graph's value where those layers end, computed once per image, instead of from the
images. A step then skips their forward and backward. In a CNN the first layers hold a small share of the weights
and a large share of a step's work: theirs are the largest feature maps.

The loss terms of the interest tensors inside the prefix are constants once its layers are frozen, so the steps
leave them out; the gradients are those of the whole-network loss with the prefix frozen.

Before it freezes, the prefix may train alone (`prefix_loss`): through its own layers only, on its interest tensors
and its end, whose term stands for everything past it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from fxq.eptq.layerwise import supports
from fxq.ir.graph import call_sites, cuts
from fxq.ir.meta import OpKind, q
from fxq.ir.taps import interest_nodes, quantized_value, up_to
from fxq.quant.modules import QuantWeight

__all__ = ["Prefix", "PrefixLoss", "frozen_prefix", "prefix_loss", "returns_one_value", "values_at"]


@dataclass
class Prefix:
    """The layers before `cut` (frozen) and the interest tensors past it (still in the loss, by their index among
    the graph's interest tensors)."""

    cut: Node
    layers: list[QuantWeight]
    kept: list[int]
    weight_share: float  # of the quantized weights, the prefix's


def returns_one_value(gm: GraphModule) -> bool:
    """Whether `gm` returns one value (not a tuple or dict of them): then the loss has the output as a term."""
    return isinstance(next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0], Node)


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
    one_output = returns_one_value(gm)  # the loss then has the output too
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


@dataclass
class PrefixLoss:
    """What trains the prefix's layers alone: the quantized graph's values at `taps` (its end first, then the
    interest tensors inside it), the float graph's at the nodes named `sources`, and the weights of their terms."""

    taps: list[Node]
    sources: list[str]
    weights: Tensor


def prefix_loss(gm: GraphModule, prefix: Prefix, weights: Tensor, with_output: bool) -> PrefixLoss:
    """The whole graph's loss (its terms' `weights`, the output's first when `with_output`) as the prefix's layers
    see it with the rest of the graph float: the interest tensors inside the prefix keep their terms, and the
    prefix's end takes the weights of every term past it too, since the graph past the cut reads the prefix through
    it alone. Scaled as the whole loss is (a mean over its terms)."""
    z = interest_nodes(gm)
    cut = prefix.cut
    source = q(cut).observes if q(cut).kind is OpKind.ACT_QUANT and q(cut).observes is not None else cut
    out, kept = int(with_output), set(prefix.kept)
    past = [*range(out), *(k + out for k in prefix.kept)]
    cut_weight = weights[past].sum()
    taps, sources, inside = [cut], [source.name], []
    for k, n in enumerate(z):
        if k in kept:
            continue
        if quantized_value(n) is cut:  # the end is an interest tensor too: its own term joins the end's
            cut_weight = cut_weight + weights[k + out]
        else:
            taps.append(quantized_value(n))
            sources.append(n.name)
            inside.append(weights[k + out])
    terms = torch.stack([cut_weight, *inside])
    return PrefixLoss(taps, sources, terms * (len(terms) / len(weights)))


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
