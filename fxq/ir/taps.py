"""Taps: a GraphModule that also returns chosen intermediate tensors, for losses over interest tensors.

Rewriting the output node (rather than hooking an Interpreter) keeps the forward a plain compiled
GraphModule that torch.compile can take whole, and it shares its submodules (and so its trainable
state) with the graph it was made from.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_arg

from fxq.errors import GraphCheckFailed
from fxq.ir.graph import input_shape_nodes, shaped_like_input
from fxq.ir.meta import OpKind, q

__all__ = ["interest_nodes", "quantized_value", "with_taps", "up_to", "from_cut"]


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


def up_to(gm: GraphModule, node: Node, taps: Sequence[Node] | None = None) -> GraphModule:
    """A GraphModule computing `gm` as far as `node` and returning its value, or the tuple (value, tap_1, ...,
    tap_n) when given `taps` (the nodes it does not read dropped)."""
    graph, env = Graph(), {}
    graph.graph_copy(gm.graph, env)
    missing = [n.name for n in (node, *(taps or ())) if n not in env]
    if missing:
        raise GraphCheckFailed(f"taps: nodes {missing[:3]} are not in this graph")
    graph.output(env[node] if taps is None else (env[node], *[env[n] for n in taps]))
    return _pruned(GraphModule(gm, graph, class_name="UpTo"))


def from_cut(gm: GraphModule, cut: Node, taps: list[Node]) -> GraphModule:
    """A GraphModule taking the value of `cut` (a node through which alone the rest of `gm` reads what came
    before: fxq.ir.graph.cuts) and `gm`'s input, computing `gm` from there and returning (output, tap_1, ...,
    tap_n). Shares `gm`'s submodules."""
    nodes = list(gm.graph.nodes)
    if cut not in nodes:
        raise GraphCheckFailed(f"taps: node {cut.name} is not in this graph")
    graph = Graph()
    env = {cut: graph.placeholder(cut.name)}

    def read(n: Node) -> Node:
        if n not in env:
            raise GraphCheckFailed(f"taps: {n.name} is read past {cut.name}, which is not a cut of the graph")
        return env[n]

    recomputed, like_input = input_shape_nodes(gm), shaped_like_input(gm)
    image = next(n for n in nodes if n.op == "placeholder")
    for n in nodes[: nodes.index(cut)]:  # the input, constants and the input's shape may be read anywhere
        if n.op in ("placeholder", "get_attr"):
            env[n] = graph.node_copy(n, read)
        elif n in recomputed:  # its metadata reads take the input's own (the same shape, dtype and device)
            env[n] = graph.node_copy(n, lambda a: env[a] if a in env or a not in like_input else env[image])
    for n in nodes[nodes.index(cut) + 1 :]:
        if n.op == "output":
            graph.output((map_arg(n.args[0], read), *[read(t) for t in taps]))
            break
        env[n] = graph.node_copy(n, read)
    return _pruned(GraphModule(gm, graph, class_name="FromCut"))


def _pruned(gm: GraphModule) -> GraphModule:
    """`gm` without the nodes its output does not read."""
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
