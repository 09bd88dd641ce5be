"""InterestPoints: mark the tensors Z of the EPTQ loss and the LFH (arXiv 2309.11531).

Z = outputs of linear ops (conv, linear, matmul) not followed by an activation, and outputs of add and
cat, among the values that depend on the model input (a tensor computed from parameters alone, as Swin v2's
position-bias MLP over a fixed coordinate table, is the same for every image: no per-image term of the loss). "Followed by" looks through ops that only move values (view, dropout, ...). The model output is the
LFH's probe point, not an interest tensor (MCT counts it; its trace is trivially the largest).
"""

from __future__ import annotations

from collections.abc import Iterator

from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from fxq.errors import GraphCheckFailed
from fxq.ir.graph import dataflow, downstream
from fxq.ir.meta import OpKind, gq, q
from fxq.ir.passbase import FxqPass, PassResult

__all__ = ["InterestPoints"]

_LINEAR_OPS = {OpKind.CONV, OpKind.LINEAR, OpKind.MATMUL}
_MERGE_OPS = {OpKind.ADD, OpKind.CAT}
_TRANSPARENT = {OpKind.PASSTHROUGH, OpKind.OBSERVER, OpKind.ACT_QUANT}


def _next_compute(node: Node) -> Iterator[Node]:
    """The first non-transparent nodes downstream of `node` (the output node counts as one)."""
    for user in node.users:
        if user.op != "output" and q(user).kind in _TRANSPARENT:
            yield from _next_compute(user)
        else:
            yield user


def _model_outputs(gm: GraphModule) -> set[Node]:
    """Nodes whose value is (a view of) the model output."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    found: set[Node] = set()
    map_arg(out.args, found.add)
    frontier = list(found)
    while frontier:
        n = frontier.pop()
        if q(n).kind in _TRANSPARENT:
            for a in n.all_input_nodes:
                if a not in found:
                    found.add(a)
                    frontier.append(a)
    return found


class InterestPoints(FxqPass):
    """Set NodeQ.interest on every interest tensor (fxq.ir.taps.interest_nodes lists them in graph order)."""

    def requires(self, gm: GraphModule) -> None:
        if any(q(n).kind is None for n in gm.graph.nodes):
            raise GraphCheckFailed("interest_points: run Annotate first (nodes without a kind)")

    def call(self, gm: GraphModule) -> PassResult:
        outputs = _model_outputs(gm)
        inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        per_image = downstream(dataflow(gm), inputs)  # values that depend on the model input
        z = []
        for node in gm.graph.nodes:
            kind = q(node).kind
            if node in outputs or node not in per_image or kind not in _LINEAR_OPS | _MERGE_OPS:
                continue
            after = list(_next_compute(node))
            if kind in _LINEAR_OPS and after and all(q(u).kind is OpKind.ACTIVATION for u in after):
                continue
            q(node).interest = True
            z.append(node)
        gq(gm).interest_marked = True
        return PassResult(gm, modified=bool(z))
