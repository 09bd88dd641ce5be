"""The pipeline, top to bottom in one place: `passes` turns a config into the pass list of any run, and every
entry point (the verbs below, the torch.compile backend, the CLI, the bench scripts) asks it for the stages it
runs."""

from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from collections.abc import Iterable
from enum import Enum
from typing import NamedTuple

import torch
from torch import nn
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassBase
from torch.fx.passes.infra.pass_manager import PassManager
from torch.utils._pytree import tree_map

from fxq.config import LFHConfig, LossWeights, Method, PTQConfig, WeightError
from fxq.data.images import Call, batch_inputs, call_args
from fxq.debug import CHECK
from fxq.dist.world import World
from fxq.eptq.train import check_resumable
from fxq.errors import ConfigError, DataError, FxqError, TraceFailed, first_line
from fxq.frontend.parts import children_with_weights, record_calls
from fxq.frontend.trace import Frontend, trace
from fxq.io.report import Report, build_report
from fxq.ir.graph import copy_graph, float_graph
from fxq.ir.meta import Deadline, gq
from fxq.ir.ops import device_of, set_eval_
from fxq.mp.sensitivity import SensitivitySettings
from fxq.passes.annotate import Annotate
from fxq.passes.fold_bn import FoldBN
from fxq.passes.interest_points import InterestPoints
from fxq.passes.lfh import LFH
from fxq.passes.mixed_precision import MixedPrecision, Sensitivity
from fxq.passes.normalize import Normalize
from fxq.passes.observe import Calibrate, Observe
from fxq.passes.quantize import Quantize
from fxq.passes.quantize_bias import QuantizeBias
from fxq.passes.rounding import Rounding, SnapshotTeacher
from fxq.passes.select_allocation import SelectAllocation
from fxq.passes.shapes import PropagateShapes
from fxq.quant.convert import ConvertSettings, is_calibrated

__all__ = [
    "Stage",
    "ALL_STAGES",
    "passes",
    "run_passes",
    "Quantized",
    "prepare",
    "convert",
    "analyze",
    "quantize_analyzed",
    "allocate",
    "quantize",
    "quantize_graph",
    "label_free_hessian",
]


class Stage(Enum):
    """The stages of a run, in order; an entry point runs a contiguous part of them."""

    FLOAT = "float"  # one IR form, BN folded, shapes, quantizer specs, interest tensors
    ANALYSIS = "analysis"  # LFH traces and mixed-precision sensitivities, on the float graph
    OBSERVE = "observe"  # observers on every quantized activation (and layer-input statistics)
    CALIBRATE = "calibrate"  # the calibration batches through the observers
    ALLOCATE = "allocate"  # the bit allocation ILP and the choice among measures
    CONVERT = "convert"  # observers and layers become fake-quant modules
    ROUNDING = "rounding"  # EPTQ's rounding optimization
    FINISH = "finish"  # biases onto the integer grid


ALL_STAGES = tuple(Stage)


class Quantized(NamedTuple):
    model: GraphModule | nn.Module  # nn.Module: a model quantized part by part, its other code float
    report: Report


def _input_stats(cfg: PTQConfig) -> bool:
    """Whether the convert needs each weighted layer's input statistics (bias correction, output-error thresholds)."""
    return cfg.bias_correction or cfg.weight_error is WeightError.OUTPUT


def _needs_lfh(cfg: PTQConfig) -> bool:
    mp = cfg.mixed_precision
    return (mp is not None and LossWeights.LFH in mp.measures) or (
        cfg.method is Method.EPTQ and cfg.rounding.loss_weights_read is LossWeights.LFH
    )


def _settings(cfg: PTQConfig) -> ConvertSettings:
    return ConvertSettings(cfg.act_threshold, cfg.weight_grid, cfg.weight_error, cfg.bias_correction)


def passes(
    cfg: PTQConfig,
    batches: list | None = None,
    example_inputs: tuple | None = None,
    stages: Iterable[Stage] = ALL_STAGES,
    lfh: bool = False,
    world: World | None = None,
) -> list[PassBase]:
    """The passes of the `stages` of a run of `cfg`, in order, on calibration `batches` (the stages that read
    data need them) and `example_inputs` (FLOAT needs one batch); `lfh` asks for the LFH whatever cfg needs.

    `world` (default: torch.distributed's, when initialised) shares the stages that read data among the ranks of
    a data-parallel run; every rank passes the same batches and ends with the one-process result."""
    stages = set(stages)
    world = World.current() if world is None else world
    mp, eptq = cfg.mixed_precision, cfg.method is Method.EPTQ
    readers = {
        Stage.ANALYSIS: lfh or _needs_lfh(cfg) or mp is not None,
        Stage.CALIBRATE: True,
        Stage.ALLOCATE: mp is not None,
        Stage.ROUNDING: eptq,
    }
    if batches is None and (missing := [s.value for s, reads in readers.items() if reads and s in stages]):
        raise ConfigError(f"pipeline: the stages {missing} read calibration data; pass the calibration batches")
    out: list[PassBase] = []
    if Stage.FLOAT in stages:
        out += [
            Normalize(),  # one form for conv/linear/bn whatever the front-end produced
            PropagateShapes(example_inputs),  # annotate needs to know which outputs are float tensors; fold_bn
            # which dim a BatchNorm behind a reshape normalizes
            FoldBN(),  # before annotate: the folded weights are what gets quantized
            Annotate(cfg.target),  # which ops get which quantizer spec, which fuse with their activation
            InterestPoints(),  # Z: linear-op outputs not followed by an activation, add, cat
        ]
    if Stage.ANALYSIS in stages:
        if lfh or _needs_lfh(cfg):  # on the float graph: the loss weights of the rounding and the sensitivities
            out.append(LFH(batches, cfg.lfh, cfg.progress, world))
        if mp is not None:
            s = SensitivitySettings(cfg.weight_grid, cfg.act_threshold, cfg.weight_error, cfg.bias_correction)
            out.append(Sensitivity(batches, mp, s, cfg.progress, world))
    if Stage.OBSERVE in stages:
        out.append(Observe(input_stats=_input_stats(cfg)))  # observers on quantized activations (+ layer inputs)
    if Stage.CALIBRATE in stages:
        # before the allocation: what the observers record does not depend on the widths, so the allocation's
        # check, every budget of a sweep and the final convert share this one calibration
        out.append(Calibrate(batches, cfg.progress, world))
    if Stage.ALLOCATE in stages and mp is not None:
        out.append(MixedPrecision(mp, cfg.target.act_bits, world))
        if mp.select_from is None or mp.select_from:  # a no-op when only one measure was weighed
            out.append(SelectAllocation(batches, _settings(cfg), cfg.target.bias_bits, mp.check_images, world))
    if Stage.CONVERT in stages:
        if eptq:  # the rounding's teacher: the float graph as calibrated, before it is quantized
            out.append(SnapshotTeacher())
        out.append(Quantize(_settings(cfg)))
    if Stage.ROUNDING in stages and eptq:
        images = torch.cat([batch_inputs(b) for b in batches])
        out.append(Rounding(images, cfg.rounding, cfg.progress, world))
    if Stage.FINISH in stages and cfg.target.bias_bits is not None:
        out.append(QuantizeBias(cfg.target.bias_bits))  # after the last pass that trains the biases
    return out


def run_passes(gm: GraphModule, passes: list[PassBase]) -> GraphModule:
    """Run passes with torch.fx's PassManager; fxq's own errors come out as they were raised."""
    try:
        return PassManager(passes, run_checks_after_each_pass=CHECK)(gm).graph_module
    except Exception as e:  # PassManager wraps every error in a bare Exception naming the pass
        if isinstance(e.__cause__, FxqError):
            raise e.__cause__ from None
        raise


def _batches(data: Iterable) -> list:
    batches = data if hasattr(data, "__len__") else list(data)
    for b in batches:
        call_args(b)  # a clear error for what is not a batch
        return batches
    raise DataError("the calibration data is empty; give at least one batch of images")


def _example(batches: list) -> tuple:
    return tree_map(lambda t: t[:2] if isinstance(t, torch.Tensor) else t, call_args(batches[0]))


def _traced(model: nn.Module, example_inputs: tuple, config: PTQConfig) -> tuple[GraphModule, tuple]:
    deadline = _deadline(config)  # the budget counts the model's copy too: it is the caller's wall time
    model = set_eval_(copy.deepcopy(model))
    device = device_of(model)
    example_inputs = tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, tuple(example_inputs))
    t0 = time.perf_counter()
    gm = trace(model, example_inputs, config.frontend, config.leaf_modules)
    gq(gm).stage_seconds["Trace"] = time.perf_counter() - t0
    gq(gm).deadline = deadline
    return gm, example_inputs


def _deadline(config: PTQConfig) -> Deadline | None:
    """The run's clock, started now, when it has a time budget."""
    return Deadline.after(config.time_budget) if config.time_budget is not None else None


def _needs_data_everywhere(config: PTQConfig, verb: str) -> None:
    if config.method is Method.EPTQ or config.mixed_precision is not None:
        raise ConfigError(
            f"fxq.{verb}: prepare/convert run round-to-nearest on the calibration you run between them; EPTQ and "
            f"mixed precision read the data before and after it, so use fxq.quantize (or fxq.backend for "
            f"torch.compile)"
        )


def prepare(model: nn.Module, example_inputs: tuple, config: PTQConfig = PTQConfig()) -> GraphModule:
    """Trace a copy of `model` and insert observers; run it on calibration data, then `convert` it."""
    _needs_data_everywhere(config, "prepare")
    gm, example_inputs = _traced(model, example_inputs, config)
    return run_passes(gm, passes(config, None, example_inputs, (Stage.FLOAT, Stage.OBSERVE)))


def convert(gm: GraphModule, config: PTQConfig = PTQConfig()) -> GraphModule:
    """Turn a calibrated, observed graph into the fake-quant reference model."""
    _needs_data_everywhere(config, "convert")
    return run_passes(gm, passes(config, None, None, (Stage.CONVERT, Stage.FINISH)))


def label_free_hessian(
    model: nn.Module, images: Iterable, lfh: LFHConfig = LFHConfig(), config: PTQConfig = PTQConfig()
) -> Quantized:
    """LFH traces of every interest tensor of `model` (float), on unlabeled `images`.

    Returns the float, annotated GraphModule (traces in node.meta["fxq"]) and a report whose layers carry
    `lfh`, `lfh_stderr` and `lfh_weight`.
    """
    batches = _batches(images)
    config = dataclasses.replace(config, lfh=lfh)
    gm, example_inputs = _traced(model, _example(batches), config)
    gm = run_passes(gm, passes(config, batches, example_inputs, (Stage.FLOAT, Stage.ANALYSIS), lfh=True))
    return Quantized(gm, build_report(gm, config, model_name=type(model).__name__))


_ANALYSIS = (Stage.FLOAT, Stage.ANALYSIS, Stage.OBSERVE, Stage.CALIBRATE, Stage.ALLOCATE)
_QUANTIZE = (Stage.CONVERT, Stage.ROUNDING, Stage.FINISH)


def analyze(model: nn.Module, calib_data: Iterable, config: PTQConfig) -> GraphModule:
    """The calibrated float graph with what the analysis learned (LFH, sensitivities, chosen bits) in node.meta;
    the observers pass values through unchanged."""
    batches = _batches(calib_data)
    gm, example_inputs = _traced(model, _example(batches), config)
    return run_passes(gm, passes(config, batches, example_inputs, _ANALYSIS))


def quantize_analyzed(gm: GraphModule, calib_data: Iterable, config: PTQConfig, name: str = "model") -> Quantized:
    """Convert and (EPTQ) optimize the rounding of a graph from `analyze`; `gm` is consumed.

    Give the same `calib_data` analyze calibrated on; the graph is calibrated again only if `config` needs
    layer-input statistics it lacks."""
    batches = _batches(calib_data)
    stages = _QUANTIZE
    if not is_calibrated(gm, input_stats=_input_stats(config)):
        gm = float_graph(gm) if gq(gm).calib_images else gm
        stages = (Stage.OBSERVE, Stage.CALIBRATE, *_QUANTIZE)
    gm = run_passes(gm, passes(config, batches, None, stages))
    return Quantized(gm, build_report(gm, config, model_name=name))


def allocate(analyzed: GraphModule, calib_data: Iterable, config: PTQConfig) -> GraphModule:
    """A copy of a graph from `analyze` with the widths `config`'s budget allocates (a sweep over budgets measures
    and calibrates once); quantize it with `quantize_analyzed`."""
    return run_passes(copy_graph(analyzed), passes(config, _batches(calib_data), None, (Stage.ALLOCATE,)))


def quantize_graph(gm: GraphModule, calib_data: Iterable, config: PTQConfig, example_inputs: tuple) -> GraphModule:
    """Every stage of a run on a graph a front-end already made (the torch.compile backend's entry)."""
    _check_before_work(config)
    if gq(gm).deadline is None:
        gq(gm).deadline = _deadline(config)
    return run_passes(gm, passes(config, _batches(calib_data), example_inputs))


def quantize(model: nn.Module, calib_data: Iterable, config: PTQConfig = PTQConfig()) -> Quantized:
    """Post-training quantization of `model` on unlabeled `calib_data` (batches of inputs, or (inputs, labels)).

    The model is not changed. Returns the quantized GraphModule and a report (per-layer bits and thresholds,
    time per stage). With `method=EPTQ` the float graph's LFH weighs a rounding optimization that follows RTN;
    with `mixed_precision` an ILP picks each layer's weight width under the budget first.

    Example:
        qgm, report = fxq.quantize(model, calib_loader, PTQConfig(target=fxq.INT8.with_bits(weight_bits=4)))
    """
    _check_before_work(config)
    batches = _batches(calib_data)
    try:
        gm = analyze(model, batches, config)
    except TraceFailed as failed:
        if config.frontend is not Frontend.AUTO:
            raise
        return _quantize_parts(model, batches, config, failed)
    return quantize_analyzed(gm, batches, config, type(model).__name__)


def _quantize_parts(model: nn.Module, batches: list, config: PTQConfig, failed: TraceFailed) -> Quantized:
    """`model` with its largest traceable sub-modules quantized, each on the inputs the float model gives it, and
    the rest float (fxq.frontend.parts). A part whose calls are not single tensors is quantized round-to-nearest."""
    model = set_eval_(copy.deepcopy(model))
    parts: dict[str, Quantized] = {}
    left_float: dict[str, str] = {}
    frontier = [""]
    while frontier:
        paths = [p for parent in frontier for p in children_with_weights(model, parent)]
        calls = record_calls(model, batches, paths)  # one float pass over the calibration data per level
        frontier = []
        for path in paths:
            if not calls[path]:
                left_float[path] = "called with keyword arguments" if calls[path] is None else "never called"
                continue
            try:
                parts[path] = _quantize_part(model.get_submodule(path), calls[path], config)
            except FxqError as e:
                if children_with_weights(model, path):
                    frontier.append(path)  # try its own sub-modules
                else:
                    left_float[path] = first_line(e)
    if not parts:
        raise failed
    for path, part in parts.items():
        model.set_submodule(path, part.model)
    warnings.warn(
        f"fxq: no front-end traced {type(model).__name__} whole ({first_line(failed)}); quantized its parts "
        f"{sorted(parts)}, the rest runs float" + (f" (float: {sorted(left_float)})" if left_float else ""),
        stacklevel=3,
    )
    report = Report.of_parts(type(model).__name__, {p: q.report for p, q in parts.items()}, left_float)
    return Quantized(model, report)


def _quantize_part(part: nn.Module, calls: list[Call], config: PTQConfig) -> Quantized:
    if all(len(c) == 1 and isinstance(c[0], torch.Tensor) for c in calls):
        batches = [c[0] for c in calls]
    else:  # EPTQ and mixed precision read image batches
        batches, config = calls, dataclasses.replace(config, method=Method.RTN, mixed_precision=None)
    gm = analyze(part, batches, config)  # front-end auto, as the whole model's
    return quantize_analyzed(gm, batches, config, type(part).__name__)


def _check_before_work(config: PTQConfig) -> None:
    """What can be refused before a pass runs: a resume whose checkpoint is missing, damaged or from other
    settings."""
    if config.method == Method.EPTQ and World.current().main:  # rank 0 alone reads and writes checkpoints
        check_resumable(config.rounding)
