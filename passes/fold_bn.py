"""FoldBN: eval-mode BatchNorm folded into the conv/linear that feeds it."""

from __future__ import annotations

from torch import nn
from torch.fx import GraphModule, Node
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from fxq.errors import GraphCheckFailed
from fxq.ir.passbase import FxqPass, PassResult

__all__ = ["FoldBN"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _bn_after_linear_op(gm: GraphModule) -> list[tuple[Node, Node]]:
    """(producer, bn) pairs where the bn is the producer's only user: only then can the weights change."""
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        src = node.args[0]
        if not isinstance(src, Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        if isinstance(gm.get_submodule(src.target), (*_CONVS, nn.Linear)):
            pairs.append((src, node))
    return pairs


def _fold(gm: GraphModule, src: Node, bn: Node) -> None:
    layer, norm = gm.get_submodule(src.target), gm.get_submodule(bn.target)
    if isinstance(layer, nn.Linear):
        fused = fuse_linear_bn_eval(layer, norm)
    else:
        fused = fuse_conv_bn_eval(layer, norm)
    gm.add_submodule(src.target, fused)  # replaces the layer in place; the node keeps its name and meta
    bn.replace_all_uses_with(src)
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
