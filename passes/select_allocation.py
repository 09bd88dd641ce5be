"""SelectAllocation: of the bit allocations MixedPrecision solved under several sensitivity measures, keep the
one whose RTN model agrees most often with the float model's top-1 on held-out calibration images.

No single measure wins everywhere; this label-free check of the quantized models (fxq.mp.select) chooses per
model and budget. It costs one threshold fit and one pass over the check images per candidate, on the
calibration the final model uses.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.fx import GraphModule

from fxq.dist.world import World
from fxq.errors import GraphCheckFailed
from fxq.ir.graph import copy_graph, float_graph
from fxq.ir.passbase import FxqPass, PassResult
from fxq.mp.plan import apply_plan, mp_state
from fxq.mp.select import last_images, top1, top1_matches
from fxq.quant.bias import quantize_biases_
from fxq.quant.convert import ConvertSettings, convert_, is_calibrated

__all__ = ["SelectAllocation"]


class SelectAllocation(FxqPass):
    """Apply the candidate allocation whose RTN model agrees best with the float graph on the last `check_images`
    calibration images; ties keep the first measure (the configured one).

    Runs on a calibrated graph (Observe, Calibrate): what the observers record does not depend on the widths,
    so one calibration serves every candidate, every budget of a sweep and the final convert; the threshold fit,
    which does read the widths, runs once per candidate, on a copy.
    """

    def __init__(
        self,
        batches: Iterable,
        settings: ConvertSettings,
        bias_bits: int | None,
        check_images: int,
        world: World = World(),
    ):
        self.batches, self.settings, self.bias_bits, self.check_images = batches, settings, bias_bits, check_images
        self.world = world  # each rank checks its part of the images; the counts are summed

    def requires(self, gm: GraphModule) -> None:
        if mp_state(gm).candidates and not is_calibrated(gm):
            raise GraphCheckFailed("select allocation: the graph is not calibrated; run Observe and Calibrate first")

    def call(self, gm: GraphModule) -> PassResult:
        state = mp_state(gm)
        if not state.candidates:
            return PassResult(gm, modified=False)
        x = last_images(self.batches, self.check_images)
        mine = x[self.world.part(len(x))]
        reference = top1(float_graph(gm), mine)  # observers out: the check images must not join the calibration
        scores = {}
        for measure in state.candidates:
            trial = copy_graph(gm)  # its plans point at its own nodes
            apply_plan(trial, mp_state(trial).candidates[measure])
            trial = convert_(trial, self.settings)
            if self.bias_bits is not None:  # the model as it would ship: biases on the int32 grid
                quantize_biases_(trial, self.bias_bits)
            same = torch.tensor([top1_matches(trial, mine, reference)], dtype=torch.int64)
            scores[measure] = 100 * int(self.world.sum_(same, "the allocation check")) / len(x)
        best = max(scores, key=scores.__getitem__)  # dict order: the configured measure first, so it wins ties
        apply_plan(gm, state.candidates[best])
        state.selected, state.agreement, state.check_images = best, scores, len(x)
        return PassResult(gm, modified=True)
