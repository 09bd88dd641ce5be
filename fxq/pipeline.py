"""The pipeline, top to bottom in one place, and the public verbs that run it."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassBase
from torch.fx.passes.infra.pass_manager import PassManager

from fxq.config import LFHConfig, LossWeights, Method, PTQConfig, WeightError
from fxq.data import batch_inputs
from fxq.debug import CHECK
from fxq.errors import DataError, FxqError
from fxq.frontend import trace
from fxq.meta import gq
from fxq.ops import device_of, set_eval_
from fxq.passes.annotate import Annotate
from fxq.passes.fold_bn import FoldBN
from fxq.passes.interest_points import InterestPoints
from fxq.passes.lfh import LFH
from fxq.passes.mixed_precision import MixedPrecision, Sensitivity
from fxq.passes.normalize import Normalize
from fxq.passes.observe import Calibrate, Observe, float_graph, is_calibrated
from fxq.passes.quantize import Quantize
from fxq.passes.quantize_bias import QuantizeBias
from fxq.passes.rounding import Rounding, float_teacher
from fxq.passes.select_allocation import SelectAllocation
from fxq.passes.shapes import PropagateShapes
from fxq.report import Report, build_report

__all__ = [
    "Quantized",
    "prepare_passes",
    "analysis_passes",
    "run_passes",
    "prepare",
    "convert",
    "analyze",
    "quantize_analyzed",
    "quantize",
    "label_free_hessian",
]


class Quantized(NamedTuple):
    model: GraphModule
    report: Report


def float_passes(cfg: PTQConfig, example_inputs: tuple) -> list[PassBase]:
    return [
        Normalize(),  # one form for conv/linear/bn whatever the front-end produced
        FoldBN(),  # before annotate: the folded weights are what gets quantized
        PropagateShapes(example_inputs),  # annotate needs to know which outputs are float tensors
        Annotate(cfg.target),  # which ops get which quantizer spec, which fuse with their activation
        InterestPoints(),  # Z: linear-op outputs not followed by an activation, add, cat
    ]


def prepare_passes(cfg: PTQConfig, example_inputs: tuple) -> list[PassBase]:
    return [*float_passes(cfg, example_inputs), _observe(cfg)]


def _input_stats(cfg: PTQConfig) -> bool:
    """Whether the convert needs each weighted layer's input statistics (bias correction, output-error thresholds)."""
    return cfg.bias_correction or cfg.weight_error is WeightError.OUTPUT


def _observe(cfg: PTQConfig) -> PassBase:
    return Observe(input_stats=_input_stats(cfg))  # observers on quantized activations (+ layer input statistics)


def convert_passes(cfg: PTQConfig) -> list[PassBase]:
    # observers and layers become fake-quant modules
    return [Quantize(cfg.act_threshold, cfg.weight_grid, cfg.weight_error, cfg.bias_correction)]


def finish_passes(cfg: PTQConfig) -> list[PassBase]:
    """After the last pass that trains: biases onto the integer grid the target adds them on."""
    return [] if cfg.target.bias_bits is None else [QuantizeBias(cfg.target.bias_bits)]


def run_passes(gm: GraphModule, passes: list[PassBase]) -> GraphModule:
    """Run passes with torch.fx's PassManager; fxq's own errors come out as they were raised."""
    try:
        return PassManager(passes, run_checks_after_each_pass=CHECK)(gm).graph_module
    except Exception as e:  # PassManager wraps every error in a bare Exception naming the pass
        if isinstance(e.__cause__, FxqError):
            raise e.__cause__ from None
        raise


def _first_batch(batches: Iterable) -> torch.Tensor:
    for b in batches:
        return batch_inputs(b)[:2]
    raise DataError("the calibration data is empty; give at least one batch of images")


def _traced(model: nn.Module, example_inputs: tuple, config: PTQConfig) -> tuple[GraphModule, tuple]:
    model = set_eval_(copy.deepcopy(model))
    device = device_of(model)
    example_inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in example_inputs)
    t0 = time.perf_counter()
    gm = trace(model, example_inputs, config.frontend, config.leaf_modules)
    gq(gm).stage_seconds["Trace"] = time.perf_counter() - t0
    return gm, example_inputs


def prepare(model: nn.Module, example_inputs: tuple, config: PTQConfig = PTQConfig()) -> GraphModule:
    """Trace a copy of `model` and insert observers; run it on calibration data, then `convert` it."""
    gm, example_inputs = _traced(model, example_inputs, config)
    return run_passes(gm, prepare_passes(config, example_inputs))


def label_free_hessian(
    model: nn.Module, images: Iterable, lfh: LFHConfig = LFHConfig(), config: PTQConfig = PTQConfig()
) -> Quantized:
    """LFH traces of every interest tensor of `model` (float), on unlabeled `images`.

    Returns the float, annotated GraphModule (traces in node.meta["fxq"]) and a report whose layers carry
    `lfh`, `lfh_stderr` and `lfh_weight`.
    """
    batches = images if hasattr(images, "__len__") else list(images)
    gm, example_inputs = _traced(model, (_first_batch(batches),), config)
    gm = run_passes(gm, [*float_passes(config, example_inputs), LFH(batches, lfh, config.progress)])
    return Quantized(gm, build_report(gm, config, model_name=type(model).__name__))


def convert(gm: GraphModule, config: PTQConfig = PTQConfig()) -> GraphModule:
    """Turn a calibrated, observed graph into the fake-quant reference model."""
    return run_passes(gm, [*convert_passes(config), *finish_passes(config)])


def analysis_passes(cfg: PTQConfig, batches: list) -> list[PassBase]:
    """On the float graph: the LFH when the rounding or mixed precision needs it, then the sensitivities, the
    calibration and the bit allocation."""
    mp, eptq = cfg.mixed_precision, cfg.method is Method.EPTQ
    needs_lfh = (mp is not None and LossWeights.LFH in mp.measures) or (
        eptq and cfg.rounding.loss_weights is LossWeights.LFH
    )
    passes: list[PassBase] = [LFH(batches, cfg.lfh, cfg.progress)] if needs_lfh else []
    if mp is not None:
        passes.append(
            Sensitivity(
                batches, mp, cfg.weight_grid, cfg.progress, cfg.act_threshold, cfg.weight_error, cfg.bias_correction
            )
        )
        # calibrated here, once: the observers do not depend on the widths, so the allocation's check, every
        # budget of a sweep and the final convert all use this one calibration
        passes += [*_calibrate_passes(cfg, batches, cfg.progress), *allocation_passes(cfg, batches)]
    return passes


def allocation_passes(cfg: PTQConfig, batches: list) -> list[PassBase]:
    """From measured sensitivities to widths, on the calibrated graph: the ILP, then, where Sensitivity weighed
    several measures (by default LFH and output for a classifier), the label-free choice among their
    allocations. A sweep over budgets reruns only these on copies of one analyzed graph."""
    mp = cfg.mixed_precision
    passes: list[PassBase] = [MixedPrecision(mp, cfg.target.act_bits)]
    if mp.select_from is None or mp.select_from:  # a no-op when only one measure was weighed
        passes.append(SelectAllocation(batches, convert=lambda g: convert(g, cfg), check_images=mp.check_images))
    return passes


def _calibrate_passes(cfg: PTQConfig, batches: list, progress: bool) -> list[PassBase]:
    return [_observe(cfg), Calibrate(batches, progress)]


def _calibrate_and_convert(cfg: PTQConfig, batches: list, progress: bool) -> list[PassBase]:
    return [*_calibrate_passes(cfg, batches, progress), *convert_passes(cfg)]


def analyze(model: nn.Module, calib_data: Iterable, config: PTQConfig) -> GraphModule:
    """The float graph with what the analysis passes learned (LFH, sensitivities, chosen bits) in node.meta;
    with mixed precision it also holds the calibrated observers (they pass values through unchanged)."""
    batches = calib_data if hasattr(calib_data, "__len__") else list(calib_data)
    gm, example_inputs = _traced(model, (_first_batch(batches),), config)
    return run_passes(gm, [*float_passes(config, example_inputs), *analysis_passes(config, batches)])


def quantize_analyzed(gm: GraphModule, calib_data: Iterable, config: PTQConfig, name: str = "model") -> Quantized:
    """Calibrate, convert and (EPTQ) optimize the rounding of a float graph from `analyze`; `gm` is consumed.

    A graph `analyze` calibrated (as it does for mixed precision) keeps that calibration, so give the same
    `calib_data`; it is calibrated again only if `config` needs layer-input statistics it lacks."""
    batches = calib_data if hasattr(calib_data, "__len__") else list(calib_data)
    if is_calibrated(gm, input_stats=_input_stats(config)):
        passes = convert_passes(config)
    else:
        gm = float_graph(gm) if gq(gm).calib_images else gm
        passes = _calibrate_and_convert(config, batches, config.progress)
    if config.method is Method.EPTQ:
        images = torch.cat([batch_inputs(b) for b in batches])
        passes.append(Rounding(float_teacher(gm), images, config.rounding, config.progress))
    gm = run_passes(gm, [*passes, *finish_passes(config)])
    return Quantized(gm, build_report(gm, config, model_name=name))


def quantize(model: nn.Module, calib_data: Iterable, config: PTQConfig = PTQConfig()) -> Quantized:
    """Post-training quantization of `model` on unlabeled `calib_data` (batches of inputs, or (inputs, labels)).

    The model is not changed. Returns the quantized GraphModule and a report (per-layer bits and thresholds,
    time per stage). With `method=EPTQ` the float graph's LFH weighs a rounding optimization that follows RTN;
    with `mixed_precision` an ILP picks each layer's weight width under the budget first.

    Example:
        qgm, report = fxq.quantize(model, calib_loader, PTQConfig(target=fxq.INT8.with_bits(weight_bits=4)))
    """
    batches = calib_data if hasattr(calib_data, "__len__") else list(calib_data)
    gm = analyze(model, batches, config)
    return quantize_analyzed(gm, batches, config, type(model).__name__)
