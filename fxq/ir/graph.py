"""Graph copies and views: a deep copy with its own quantization state, the float graph under the observers, and
reachability over the fx graph (networkx, built once per graph)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import networkx as nx
import torch
from torch.fx import GraphModule, Node

from fxq.ir.meta import OpKind, gq, q

__all__ = [
    "without_graph_state",
    "copy_graph",
    "nodes_by_name",
    "float_graph",
    "dataflow",
    "downstream",
    "remap_nodes",
    "call_sites",
    "value_users",
    "cuts",
    "input_shape_nodes",
    "shaped_like_input",
]

# reads of a tensor that leave its values out: its shape, rank, dtype (timm's norm layers assert x.ndim)
_METADATA_ATTRS = {"ndim", "shape", "dtype", "device", "is_cuda"}
_METADATA_METHODS = {"size", "dim", "numel"}
_METADATA_OPS = {torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default, torch.ops.aten.sym_stride.int}
_SHAPED_LIKE = {"reshape_as", "view_as", "expand_as"}  # x.reshape_as(y) reads y's shape only


@contextmanager
def without_graph_state(gm: GraphModule) -> Iterator[GraphModule]:
    """gm with gm.meta["fxq"] set aside: it holds Nodes, which neither pickle nor deep-copy cleanly."""
    state = gm.meta.pop("fxq", None)
    try:
        yield gm
    finally:
        if state is not None:
            gm.meta["fxq"] = state


def remap_nodes(obj, by_name: dict[str, Node]):
    """`obj` (NodeQ / GraphQ fields: dataclasses, dicts, lists, tuples) with every Node replaced by the node of the
    same name in `by_name`; everything else copied."""
    if isinstance(obj, Node):
        return by_name[obj.name]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(
            obj, **{f.name: remap_nodes(getattr(obj, f.name), by_name) for f in dataclasses.fields(obj) if f.init}
        )
    if isinstance(obj, dict):
        return {remap_nodes(k, by_name): remap_nodes(v, by_name) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(remap_nodes(v, by_name) for v in obj)
    return copy.deepcopy(obj)


def nodes_by_name(gm: GraphModule) -> dict[str, Node]:
    """`gm`'s nodes by name. A graph and its copies (copy_graph, float_graph) share node names, so this finds a
    node's twin in another copy: the float teacher's tensor for the quantized graph's."""
    return {n.name: n for n in gm.graph.nodes}


def copy_graph(gm: GraphModule) -> GraphModule:
    """A deep copy of `gm` whose quantization state is its own, its Node references pointing into the copy.

    (torch.fx copies node.meta shallowly, so a plain deepcopy would share every NodeQ with the original.)
    """
    with without_graph_state(gm):
        new = copy.deepcopy(gm)
    by_name = nodes_by_name(new)
    for n in new.graph.nodes:
        if "fxq" in n.meta:
            n.meta["fxq"] = remap_nodes(q(n), by_name)
    if "fxq" in gm.meta:
        new.meta["fxq"] = remap_nodes(gq(gm), by_name)
    return new


def float_graph(gm: GraphModule) -> GraphModule:
    """A copy of gm with its observers taken out: the float model they watch, whose forwards leave them be."""
    out = copy_graph(gm)
    for node in [n for n in out.graph.nodes if q(n).kind is OpKind.OBSERVER]:
        node.replace_all_uses_with(node.args[0])
        out.graph.erase_node(node)
        out.delete_submodule(node.target)
    out.recompile()
    gq(out).calib_images = 0
    return out


def dataflow(gm: GraphModule) -> nx.DiGraph:
    """The fx graph's data dependencies as a networkx DiGraph of Nodes (input -> user)."""
    g = nx.DiGraph()
    g.add_nodes_from(gm.graph.nodes)
    g.add_edges_from((a, n) for n in gm.graph.nodes for a in n.all_input_nodes)
    return g


def downstream(flow: nx.DiGraph, nodes: list[Node]) -> set[Node]:
    """Every node whose value depends on one of `nodes` (the output node excluded)."""
    seen: set[Node] = set()
    for n in nodes:
        seen |= nx.descendants(flow, n)
    return {n for n in seen if n.op != "output"}


def cuts(gm: GraphModule) -> list[Node]:
    """The nodes through which alone the rest of the graph reads what came before, in graph order: past such a
    node nothing before it is read again but the input, constants (get_attr) and the input's shape (`input_shape_
    nodes`), so the graph from there on is a function of its value and the input. None in a graph with several
    inputs."""
    nodes = list(gm.graph.nodes)
    if sum(n.op == "placeholder" for n in nodes) != 1:
        return []
    free = input_shape_nodes(gm) | {n for n in nodes if n.op in ("placeholder", "get_attr")}
    index = {n: i for i, n in enumerate(nodes)}
    closing = [0] * len(nodes)  # how many values are read for the last time at each position
    found, held = [], 0
    for i, n in enumerate(nodes):
        if n.op == "output":
            break
        held -= closing[i]
        last = max((index[u] for u in n.users), default=i)
        if last > i and n not in free:
            held += 1
            closing[last] += 1
            if held == 1:
                found.append(n)
    return found


def shaped_like_input(gm: GraphModule) -> set[Node]:
    """The graph input and the activation quantizers of it (quantizing keeps a tensor's shape, dtype and device)."""
    found: set[Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or (q(n).kind is OpKind.ACT_QUANT and q(n).observes in found):
            found.add(n)
    return found


def input_shape_nodes(gm: GraphModule) -> set[Node]:
    """The nodes that read only the input's metadata (its shape, dtype or device, here or through a node shaped
    like it: `shaped_like_input`), and arithmetic on them: what a graph computes from `x.size(0)`."""
    like, found = shaped_like_input(gm), set()
    for n in gm.graph.nodes:
        ins = n.all_input_nodes
        if n.op not in ("call_function", "call_method") or not ins:
            continue
        if all(i in found or (i in like and _reads_metadata(n, i)) for i in ins):
            found.add(n)
    return found


def call_sites(gm: GraphModule) -> dict[str, list[Node]]:
    """Each called module's call_module nodes, in graph order: a module shared by several sites (one conv applied
    to every level of a feature pyramid) has several."""
    sites: dict[str, list[Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            sites.setdefault(n.target, []).append(n)
    return sites


def _reads_metadata(user: Node, node: Node) -> bool:
    if user.op == "call_function" and user.target is getattr and len(user.args) > 1:
        return user.args[1] in _METADATA_ATTRS
    if user.op == "call_function" and user.target in _METADATA_OPS:
        return True
    if user.op == "call_method" and user.target in _SHAPED_LIKE:
        return user.args[0] is not node
    return user.op == "call_method" and user.target in _METADATA_METHODS


def value_users(node: Node) -> list[Node]:
    """The users that read node's values, not only its shape or dtype."""
    return [u for u in node.users if not _reads_metadata(u, node)]
