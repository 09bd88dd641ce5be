"""Taps: a GraphModule that also returns chosen intermediate tensors, for losses over interest tensors.

Rewriting the output node (rather than hooking an Interpreter) keeps the forward a plain compiled
GraphModule that torch.compile can take whole, and it shares its submodules (and so its trainable
state) with the graph it was made from.
"""

from __future__ import annotations

from torch.fx import Graph, GraphModule, Node

from fxq.errors import GraphCheckFailed
from fxq.ir.meta import OpKind, q

__all__ = ["interest_nodes", "quantized_value", "with_taps"]


def interest_nodes(gm: GraphModule) -> list[Node]:
    """The interest tensors Z marked by InterestPoints, in graph order."""
    return [n for n in gm.graph.nodes if q(n).interest]


def quantized_value(node: Node) -> Node:
    """What the rest of the network reads from `node`: its activation quantizer if one follows it."""
    for user in node.users:
        if q(user).kind is OpKind.ACT_QUANT and q(user).observes is node:
            return user
    return node


def with_taps(gm: GraphModule, taps: list[Node]) -> GraphModule:
    """A GraphModule computing `gm` and returning (output, tap_1, ..., tap_n)."""
    graph, env = Graph(), {}
    out = graph.graph_copy(gm.graph, env)
    missing = [n.name for n in taps if n not in env]
    if missing:
        raise GraphCheckFailed(f"taps: nodes {missing[:3]} are not in this graph")
    graph.output((out, *[env[n] for n in taps]))
    return GraphModule(gm, graph, class_name="Tapped")
