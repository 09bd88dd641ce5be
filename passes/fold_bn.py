"""FoldBN: eval-mode BatchNorm folded into the conv/linear that feeds it."""

from __future__ import annotations

from torch import nn
from torch.fx import GraphModule, Node
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from fxq.errors import GraphCheckFailed
from fxq.ir.graph import call_sites, value_users
from fxq.ir.passbase import FxqPass, PassResult

__all__ = ["FoldBN"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# ops between a linear layer and a BatchNorm1d that only regroup rows (LeViT's bn(x.flatten(0, 1)).reshape_as(x))
_REGROUPS = {"flatten", "reshape", "view"}


def _regroups_rows(node: Node) -> bool:
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    return node.op in ("call_method", "call_function") and name in _REGROUPS


def _feeds_channels(layer: nn.Module, norm: nn.Module, producer: Node, bn_input: Node) -> bool:
    """Whether the layer's output channels are the BatchNorm's: a conv's directly; a linear layer's features
    when the BatchNorm sees (rows, features), directly or after the rows are regrouped (from the recorded
    shapes; without them, only directly and when the counts match)."""
    if not isinstance(layer, nn.Linear):
        return producer is bn_input
    seen = getattr(bn_input.meta.get("tensor_meta"), "shape", None)
    if seen is None:
        return producer is bn_input and norm.num_features == layer.out_features
    return len(seen) == 2 and seen[1] == layer.out_features


def _bn_after_linear_op(gm: GraphModule) -> list[tuple[Node, Node]]:
    """(producer, bn) pairs where the bn reads only the producer's output (directly, or a linear layer's rows
    regrouped) and the producer's module is called there alone: only then can the weights change."""
    pairs = []
    sites = call_sites(gm)
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        src = node.args[0]
        while isinstance(src, Node) and _regroups_rows(src) and len(value_users(src)) == 1:
            src = src.args[0]
        if not isinstance(src, Node) or src.op != "call_module" or len(value_users(src)) != 1:
            continue
        if len(sites[src.target]) > 1:  # a layer shared by several sites, each with its own norm: folding one
            continue  # would change the others
        layer = gm.get_submodule(src.target)
        norm = gm.get_submodule(node.target)
        if isinstance(layer, (*_CONVS, nn.Linear)) and _feeds_channels(layer, norm, src, node.args[0]):
            pairs.append((src, node))
    return pairs


def _fold(gm: GraphModule, src: Node, bn: Node) -> None:
    layer, norm = gm.get_submodule(src.target), gm.get_submodule(bn.target)
    if isinstance(layer, nn.Linear):
        fused = fuse_linear_bn_eval(layer, norm)
    else:
        fused = fuse_conv_bn_eval(layer, norm)
    gm.add_submodule(src.target, fused)  # replaces the layer in place; the node keeps its name and meta
    bn.replace_all_uses_with(bn.args[0])  # the layer's output, or its rows regrouped as the bn read them
    gm.graph.erase_node(bn)


class FoldBN(FxqPass):
    """Fold eval-mode BatchNorm into the conv/linear that feeds it (outputs unchanged up to rounding)."""

    def requires(self, gm: GraphModule) -> None:
        for name, mod in gm.named_modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training:
                raise GraphCheckFailed(
                    f"fold_bn: BatchNorm '{name}' is in training mode; call model.eval() before quantizing"
                )

    def call(self, gm: GraphModule) -> PassResult:
        pairs = _bn_after_linear_op(gm)
        for src, bn in pairs:
            _fold(gm, src, bn)
        if pairs:
            gm.delete_all_unused_submodules()
            gm.recompile()
        return PassResult(gm, modified=bool(pairs))

    def ensures(self, gm: GraphModule) -> None:
        left = _bn_after_linear_op(gm)
        if left:
            raise GraphCheckFailed(f"fold_bn: BatchNorm still follows a layer: {left[0][1].format_node()}")
