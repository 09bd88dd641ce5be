"""What passes learn, kept on the graph: node.meta["fxq"] (NodeQ) and gm.meta["fxq"] (GraphQ)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from enum import Enum

from torch import Tensor
from torch.fx import GraphModule, Node

from fxq.qmath import QSpec

__all__ = ["OpKind", "NodeQ", "GraphQ", "q", "gq", "without_graph_state", "copy_graph"]


class OpKind(Enum):
    """What an op is, as far as quantization cares."""

    INPUT = "input"
    CONV = "conv"
    LINEAR = "linear"
    MATMUL = "matmul"
    BATCHNORM = "batchnorm"
    ACTIVATION = "activation"
    ADD = "add"
    CAT = "cat"
    PASSTHROUGH = "passthrough"  # moves or selects values without making new ones (view, maxpool, dropout)
    OTHER = "other"  # computes new values (mul, mean, softmax, layernorm, ...)
    OBSERVER = "observer"
    ACT_QUANT = "act_quant"


@dataclass
class NodeQ:
    """Per-node quantization state (the one dataclass at node.meta["fxq"])."""

    kind: OpKind | None = None
    wspec: QSpec | None = None  # weight quantizer (conv/linear)
    aspec: QSpec | None = None  # quantizer of this node's output (None: output left as is)
    fused_into: Node | None = None  # the activation whose quantizer also covers this node's output
    interest: bool = False  # an interest tensor Z of the EPTQ loss / LFH
    act_range: tuple[float, float] | None = None  # observed (min, max) of the output
    act_threshold: float | None = None
    w_threshold: Tensor | None = None  # per output channel
    lfh: float | None = None  # LFH trace of this interest tensor, E_x ||J_z f(x)||_F^2
    lfh_stderr: float | None = None  # its standard error over probes and images
    lfh_weight: float | None = None  # log10(t) - min log10(t) over Z: the distillation weight lambda_z
    bits: int | None = None  # chosen weight bit-width
    bias_bits: int | None = None  # the bias sits on the integer grid s_x * s_w at this width (None: float bias)
    bit_sensitivity: dict[int, float] | None = None  # mixed precision: LFH-weighted distance per weight width
    act_bit_sensitivity: dict[int, float] | None = None  # the same per width of this node's output quantizer
    bit_sensitivity_by: dict[str, dict[int, float]] | None = None  # per measure, when several are compared
    act_bit_sensitivity_by: dict[str, dict[int, float]] | None = None
    macs: int | None = None  # multiply-accumulates per image (conv / linear)
    observes: Node | None = None  # on observer / act-quant nodes: the node whose output they quantize


@dataclass
class GraphQ:
    """Graph-wide results (gm.meta["fxq"])."""

    target: str | None = None
    frontend: str | None = None
    interest: list[Node] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    calib_images: int = 0
    lfh_probes: list[int] = field(default_factory=list)  # probes used per image batch
    rounding: dict = field(default_factory=dict)  # the rounding optimization's schedule, timing and losses
    mixed_precision: dict = field(default_factory=dict)  # options, budgets, ILP time, chosen bits per layer


def q(node: Node) -> NodeQ:
    """The one way to a node's quantization state."""
    return node.meta.setdefault("fxq", NodeQ())


def gq(gm: GraphModule) -> GraphQ:
    """The one way to the graph-wide state."""
    return gm.meta.setdefault("fxq", GraphQ())


@contextmanager
def without_graph_state(gm: GraphModule) -> Iterator[GraphModule]:
    """gm with gm.meta["fxq"] set aside: it holds Nodes, which neither pickle nor deep-copy cleanly."""
    state = gm.meta.pop("fxq", None)
    try:
        yield gm
    finally:
        if state is not None:
            gm.meta["fxq"] = state


def copy_graph(gm: GraphModule) -> GraphModule:
    """A deep copy of `gm` whose quantization state is its own, its Node references pointing into the copy.

    (torch.fx copies node.meta shallowly, so a plain deepcopy would share every NodeQ with the original.)
    """
    with without_graph_state(gm):
        new = copy.deepcopy(gm)
    by_name = {n.name: n for n in new.graph.nodes}

    def remap(n: Node | None) -> Node | None:
        return None if n is None else by_name[n.name]

    for n in new.graph.nodes:
        if "fxq" in n.meta:
            m = q(n)
            n.meta["fxq"] = replace(m, fused_into=remap(m.fused_into), observes=remap(m.observes))
    if "fxq" in gm.meta:
        g = gq(gm)
        new.meta["fxq"] = replace(
            g,
            interest=[by_name[n.name] for n in g.interest],
            stage_seconds=dict(g.stage_seconds),
            lfh_probes=list(g.lfh_probes),
            rounding=copy.deepcopy(g.rounding),
            mixed_precision=copy.deepcopy(g.mixed_precision),
        )
    return new
