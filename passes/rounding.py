"""Rounding: EPTQ's rounding optimization (fxq.eptq.train) on the quantized graph, against the float teacher
SnapshotTeacher kept before Quantize."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx import GraphModule

from fxq.config import RoundingConfig
from fxq.dist.world import World
from fxq.eptq.teacher import float_teacher
from fxq.eptq.train import RoundingOptimizer
from fxq.errors import GraphCheckFailed
from fxq.ir.meta import gq
from fxq.ir.passbase import FxqPass, PassResult
from fxq.quant.modules import QuantWeight

__all__ = ["SnapshotTeacher", "Rounding"]


class SnapshotTeacher(FxqPass):
    """Keep a frozen copy of the float graph (observers taken out) in gm.meta for the rounding optimization."""

    def call(self, gm: GraphModule) -> PassResult:
        if any(isinstance(m, QuantWeight) for m in gm.modules()):
            raise GraphCheckFailed("snapshot teacher: the graph is quantized already; run it before Quantize")
        gq(gm).teacher = float_teacher(gm)
        return PassResult(gm, modified=False)


class Rounding(FxqPass):
    """Optimize the rounding of every quantized weight (and the biases) against the teacher SnapshotTeacher kept."""

    def __init__(
        self, images: Tensor, config: RoundingConfig = RoundingConfig(), progress: bool = True, world: World = World()
    ):
        self.images = images if config.images is None else images[: config.images]
        self.cfg, self.progress, self.world = config, progress, world

    def requires(self, gm: GraphModule) -> None:
        if not any(isinstance(m, QuantWeight) for m in gm.modules()):
            raise GraphCheckFailed("rounding: no quantized weights in the graph; run Quantize first")
        if not gq(gm).interest_marked:  # none marked (a conv/ReLU stack with a linear head): the output alone
            raise GraphCheckFailed("rounding: the interest tensors were never marked; run InterestPoints first")
        if gq(gm).teacher is None:
            raise GraphCheckFailed("rounding: no float teacher kept; run SnapshotTeacher before Quantize")
        if len(self.images) == 0:
            raise GraphCheckFailed("rounding: no images given; pass the calibration images")

    def call(self, gm: GraphModule) -> PassResult:
        g = gq(gm)
        optimizer = RoundingOptimizer(g.teacher, self.images, self.cfg, self.progress, g.deadline, self.world)
        g.rounding = optimizer.run(gm)
        g.teacher = None  # its job is done; a saved or copied graph need not carry it
        return PassResult(gm, modified=True)

    def ensures(self, gm: GraphModule) -> None:
        for name, qw in gm.named_modules():
            if isinstance(qw, QuantWeight):
                w = qw.layer.weight.detach()
                if not torch.equal(qw.hard_codes() * qw.scale_like(w), w):
                    raise GraphCheckFailed(f"rounding: {name}'s weight is off its integer grid after hardening")
