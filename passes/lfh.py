"""LFH: the Label-Free Hessian trace of every interest tensor (the estimator is fxq.eptq.lfh)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from torch.fx import GraphModule

from fxq.config import LFHConfig
from fxq.data.images import batch_inputs
from fxq.dist.world import World
from fxq.eptq.lfh import lfh_traces
from fxq.errors import GraphCheckFailed
from fxq.ir.meta import OpKind, gq, q
from fxq.ir.passbase import FxqPass, PassResult
from fxq.ir.taps import interest_nodes

__all__ = ["LFH"]


class LFH(FxqPass):
    """Set NodeQ.lfh, .lfh_stderr and .lfh_weight on every interest tensor, from unlabeled images."""

    def __init__(
        self, batches: Iterable[Tensor], config: LFHConfig = LFHConfig(), progress: bool = True, world: World = World()
    ):
        self.batches = batches
        self.cfg = config
        self.progress = progress
        self.world = world  # each rank probes its part of every image batch (fxq.eptq.lfh)

    def requires(self, gm: GraphModule) -> None:
        if not gq(gm).interest_marked:
            raise GraphCheckFailed("lfh: no interest tensors marked; run InterestPoints first")
        if any(q(n).kind in (OpKind.OBSERVER, OpKind.ACT_QUANT) for n in gm.graph.nodes):
            raise GraphCheckFailed("lfh: the graph already holds observers or quantizers; run LFH on the float graph")

    def call(self, gm: GraphModule) -> PassResult:
        z = interest_nodes(gm)
        if not z:  # e.g. a single layer: the output is the only tensor, and it needs no trace
            return PassResult(gm, modified=False)
        xs = [batch_inputs(b) for b in self.batches]
        if not xs:
            raise GraphCheckFailed("lfh: no images given; pass at least one batch of representative images")
        images = torch.cat(xs)[: self.cfg.images]
        t = lfh_traces(gm, z, images, self.cfg, self.progress, gq(gm).deadline, self.world)
        for i, node in enumerate(z):
            q(node).lfh, q(node).lfh_stderr, q(node).lfh_weight = t.trace[i], t.stderr[i], t.weight[i]
        gq(gm).lfh_probes.extend(t.probes)
        return PassResult(gm, modified=False)
