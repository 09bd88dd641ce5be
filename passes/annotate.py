"""Annotate: which ops get which quantizers, from the target description.

Weights of every conv/linear module get a per-channel (target permitting) signed quantizer. Every op that
makes new float values gets an output quantizer, the model input and the last layer included; ops that only
move values (view, max-pool, dropout, zero pad) keep their input's grid and need none. A linear op or add
whose only user is an activation shares that activation's quantizer (the fused form devices run). Values that
only layer norms read stay float unless the target says otherwise (`Target.quantize_norm_inputs`).
"""

from __future__ import annotations

from torch.fx import GraphModule, Node

from fxq.errors import GraphCheckFailed
from fxq.ir.graph import value_users
from fxq.ir.meta import OpKind, gq, q
from fxq.ir.ops import WEIGHTED_MODULES, is_depthwise, is_float_tensor, is_nonnegative, is_norm, kind_of, module_of
from fxq.ir.passbase import FxqPass, PassResult
from fxq.quant.qmath import QSpec
from fxq.targets import Target

__all__ = ["Annotate"]

_NO_OUTPUT_QUANT = {OpKind.PASSTHROUGH, OpKind.OBSERVER, OpKind.ACT_QUANT}
_FUSIBLE = {OpKind.CONV, OpKind.LINEAR, OpKind.ADD, OpKind.BATCHNORM}
_INTEGER_OPS = {OpKind.CONV, OpKind.LINEAR, OpKind.MATMUL}


def _fused_activation(gm: GraphModule, node: Node, target: Target) -> Node | None:
    if not target.fuse_activation or q(node).kind not in _FUSIBLE or len(node.users) != 1:
        return None
    (user,) = node.users
    return user if kind_of(gm, user) is OpKind.ACTIVATION else None


def _readers(node: Node) -> list[Node]:
    """The ops that compute from node's values, looking through ops that only move them."""
    found = []
    for user in value_users(node):
        if user.op != "output" and q(user).kind is OpKind.PASSTHROUGH:
            found += _readers(user)
        else:
            found.append(user)
    return found


def _read_only_by_norms(gm: GraphModule) -> set[Node]:
    """Nodes whose value reaches only layer norms, directly or through ops whose own output is such a value (the
    residual adds of a transformer). Integer ops (conv, linear, matmul) and the model output need a grid."""
    found: set[Node] = set()

    def float_reader(user: Node) -> bool:
        if is_norm(gm, user):
            return True
        if user.op == "output" or q(user).kind in _INTEGER_OPS:
            return False
        return (q(user).fused_into or user) in found

    for node in reversed(gm.graph.nodes):  # readers come later in the graph: decided first
        readers = _readers(node)
        if q(node).aspec is not None and readers and all(float_reader(u) for u in readers):
            found.add(node)
    return found


class Annotate(FxqPass):
    """Set NodeQ.kind, .wspec, .aspec and .fused_into on every node."""

    def __init__(self, target: Target):
        self.target = target

    def requires(self, gm: GraphModule) -> None:
        if not any("tensor_meta" in n.meta for n in gm.graph.nodes if n.op == "placeholder"):
            raise GraphCheckFailed("annotate: run PropagateShapes first (no tensor_meta on the graph inputs)")

    def call(self, gm: GraphModule) -> PassResult:
        t = self.target
        for node in gm.graph.nodes:
            m = q(node)
            m.kind = kind_of(gm, node)
            layer = module_of(gm, node)
            if m.kind in (OpKind.CONV, OpKind.LINEAR) and isinstance(layer, WEIGHTED_MODULES):
                m.wspec = m.wspec or t.weight_spec(t.weight_bits, is_depthwise(layer))
        for node in gm.graph.nodes:
            m = q(node)
            if node.op in ("output", "get_attr") or m.kind in _NO_OUTPUT_QUANT or not is_float_tensor(node):
                continue
            m.fused_into = _fused_activation(gm, node, t)
            if m.fused_into is None:
                m.aspec = QSpec(t.act_bits, signed=not is_nonnegative(gm, node), pot=t.pot)
        if not t.quantize_norm_inputs:
            for node in _read_only_by_norms(gm):
                q(node).aspec = None
        gq(gm).target = t
        return PassResult(gm, modified=True)
