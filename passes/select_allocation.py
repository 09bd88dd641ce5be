"""SelectAllocation: of the bit allocations MixedPrecision solved under several sensitivity measures, keep the
one whose RTN model agrees most often with the float model's top-1 on held-out calibration images.

No single measure wins everywhere (on Lite0 the output alone chose better widths, on ResNet-20 at 3 bits/weight
the LFH-weighted interest tensors did); this label-free check of the quantized models kept the better one in 4
of the 5 cases measured, and never a worse one than the LFH measure alone (bench/RESULTS.md). The check costs
one threshold fit and one pass over the check images per candidate, on the calibration the final model uses.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

import torch
from fxq.passes.mixed_precision import apply_plan
from fxq.passes.observe import float_graph, is_calibrated
from torch import Tensor, nn
from torch.fx import GraphModule

from fxq.data import batch_inputs
from fxq.errors import GraphCheckFailed
from fxq.meta import copy_graph, gq
from fxq.ops import device_of, set_eval_
from fxq.passbase import FxqPass, PassResult

__all__ = ["SelectAllocation", "last_images", "top1", "top1_agreement"]


def last_images(batches: Iterable, n: int) -> Tensor:
    """The last n inputs of `batches`, holding only the batches that can still reach into them."""
    tail: deque[Tensor] = deque()
    have = 0
    for b in batches:
        tail.append(batch_inputs(b))
        have += len(tail[-1])
        while have - len(tail[0]) >= n:
            have -= len(tail.popleft())
    if not tail:
        raise ValueError("last_images: no batches given; pass the calibration batches")
    return torch.cat(list(tail))[-n:]


@torch.no_grad()
def top1(model: nn.Module, x: Tensor, batch_size: int = 50) -> Tensor:
    """Class indices of `model`'s largest output on x, in eval mode."""
    set_eval_(model)
    dev = device_of(model)
    return torch.cat([model(b.to(dev)).float().argmax(1).cpu() for b in x.split(batch_size)])


def top1_agreement(model: nn.Module, x: Tensor, reference: Tensor) -> float:
    """Percent of inputs where `model`'s top-1 equals `reference` (class indices)."""
    return float((top1(model, x) == reference).float().mean() * 100)


class SelectAllocation(FxqPass):
    """Apply the candidate allocation (NodeQ.bits, activation widths) whose RTN model agrees best with the float
    graph on the last `check_images` calibration images; ties keep the first measure (the configured one).

    Runs on a calibrated graph (Observe, Calibrate): what the observers record does not depend on the widths,
    so one calibration serves every candidate, every budget of a sweep and the final convert; `convert` (the
    threshold fit, which does read the widths) runs once per candidate, on a copy.
    """

    def __init__(self, batches: Iterable, convert: Callable[[GraphModule], GraphModule], check_images: int):
        self.batches, self.convert, self.check_images = batches, convert, check_images

    def requires(self, gm: GraphModule) -> None:
        if gq(gm).mixed_precision.get("candidates") and not is_calibrated(gm):
            raise GraphCheckFailed("select allocation: the graph is not calibrated; run Observe and Calibrate first")

    def call(self, gm: GraphModule) -> PassResult:
        candidates = gq(gm).mixed_precision.get("candidates")
        if not candidates:
            return PassResult(gm, modified=False)
        x = last_images(self.batches, self.check_images)
        reference = top1(float_graph(gm), x)  # observers out: the check images must not join the calibration
        scores = {}
        for measure, plan in candidates.items():
            trial = copy_graph(gm)
            apply_plan(trial, plan)
            scores[measure] = top1_agreement(self.convert(trial), x, reference)
        best = max(scores, key=scores.__getitem__)  # dict order: the configured measure first, so it wins ties
        apply_plan(gm, candidates[best])
        gq(gm).mixed_precision.update(selected=best, agreement=scores, check_images=len(x))
        return PassResult(gm, modified=True)
