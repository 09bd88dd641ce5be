"""The base of every fxq pass: torch.fx's PassBase, timed and logged into gm.meta["fxq"]."""

from __future__ import annotations

import time

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxq.debug import DEBUG, log
from fxq.ir.meta import gq

__all__ = ["FxqPass", "PassResult"]


class FxqPass(PassBase):
    """PassBase whose run (requires + call + ensures) is timed into gm.meta["fxq"].stage_seconds."""

    def __call__(self, gm: GraphModule) -> PassResult:
        t0 = time.perf_counter()
        res = super().__call__(gm)
        dt = time.perf_counter() - t0
        name = type(self).__name__
        gq(res.graph_module).stage_seconds[name] = gq(res.graph_module).stage_seconds.get(name, 0.0) + dt
        if DEBUG:
            log.debug("%s: %.3fs, modified=%s", name, dt, res.modified)
            if DEBUG >= 2:
                log.debug("%s", res.graph_module.graph)
        return res
