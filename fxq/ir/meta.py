"""What passes learn, kept on the graph: node.meta["fxq"] (NodeQ) and gm.meta["fxq"] (GraphQ).

Each fact has one owner. A node's weight and output widths are its specs (`wspec`, `aspec`): mixed precision
replaces them, Quantize builds the modules from them. Steps live in the modules the graph calls (QuantWeight,
ActQuant); the report reads them there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from torch.fx import GraphModule, Node

from fxq.errors import ConfigError
from fxq.quant.qmath import QSpec

if TYPE_CHECKING:
    from fxq.mp.plan import MixedPrecisionState
    from fxq.targets import Target

__all__ = ["OpKind", "NodeQ", "GraphQ", "Deadline", "q", "gq"]


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
    wspec: QSpec | None = None  # weight quantizer (conv/linear): its width is the layer's
    aspec: QSpec | None = None  # quantizer of this node's output (None: output left as is)
    fused_into: Node | None = None  # the activation whose quantizer also covers this node's output
    interest: bool = False  # an interest tensor Z of the EPTQ loss / LFH
    act_range: tuple[float, float] | None = None  # observed (min, max) of the output
    lfh: float | None = None  # LFH trace of this interest tensor, E_x ||J_z f(x)||_F^2
    lfh_stderr: float | None = None  # its standard error over probes and images
    lfh_weight: float | None = None  # log10(t) - min log10(t) over Z: the distillation weight lambda_z
    bias_bits: int | None = None  # the bias sits on the integer grid s_x * s_w at this width (None: float bias)
    sensitivity: dict[str, dict[int, float]] | None = None  # mixed precision: measure -> weight width -> distance
    act_sensitivity: dict[str, dict[int, float]] | None = None  # the same per width of this node's output quantizer
    macs: int | None = None  # multiply-accumulates per image (conv / linear)
    observes: Node | None = None  # on observer / act-quant nodes: the node whose output they quantize


@dataclass(frozen=True)
class Deadline:
    """`seconds` of wall time from `start` (time.monotonic()): the wall-clock budget of a run."""

    start: float
    seconds: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        if not seconds > 0:
            raise ConfigError(f"a time budget must be > 0 seconds, got {seconds}")
        return cls(time.monotonic(), float(seconds))

    def left(self) -> float:
        """Seconds until the deadline (negative once past it)."""
        return self.start + self.seconds - time.monotonic()

    def past_share(self, share: float) -> bool:
        """True once `share` of the budget is spent."""
        return time.monotonic() - self.start >= share * self.seconds

    def share(self, parts: int) -> Deadline:
        """The first of `parts` equal shares of the time left, starting now (already past when none is left)."""
        return Deadline(time.monotonic(), self.left() / parts)


@dataclass
class GraphQ:
    """Graph-wide results (gm.meta["fxq"])."""

    target: Target | None = None  # the device Annotate read the specs from
    frontend: str | None = None
    leaf_modules: tuple = ()  # the modules (names or classes) the front-end kept whole
    interest_marked: bool = False  # InterestPoints ran (Z may still be empty: a model of one layer)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # time per pass, for the report
    calib_images: int = 0
    lfh_probes: list[int] = field(default_factory=list)  # probes used per image batch
    rounding: dict = field(default_factory=dict)  # the rounding optimization's schedule, timing and losses
    teacher: GraphModule | None = None  # the float graph, kept from Quantize until the rounding has used it
    mixed_precision: MixedPrecisionState | None = None  # measures, candidate plans, the one applied
    deadline: Deadline | None = None  # the run's time budget (PTQConfig.time_budget), from when it was traced


def q(node: Node) -> NodeQ:
    """The one way to a node's quantization state."""
    return node.meta.setdefault("fxq", NodeQ())


def gq(gm: GraphModule) -> GraphQ:
    """The one way to the graph-wide state."""
    return gm.meta.setdefault("fxq", GraphQ())
