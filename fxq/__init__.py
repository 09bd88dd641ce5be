"""fxq: post-training quantization compiler for PyTorch, as a torch.fx pass pipeline.

import fxq
qgm, report = fxq.quantize(model, calib_batches, fxq.PTQConfig(target=fxq.INT8.with_bits(weight_bits=4)))
fxq.save(qgm, "runs/w4", model_name="resnet18")   # no pickle: specs in JSON, tensors read with weights_only
qgm = fxq.load("runs/w4").model
"""

from fxq.backends.check import CheckLimits, ExportCheck
from fxq.backends.inductor import compile_int8, package_int8, to_qdq_form
from fxq.backends.onnx import WeightStorage, export_onnx
from fxq.config import (
    ActThreshold,
    LFHConfig,
    LossWeights,
    Method,
    MixedPrecisionConfig,
    Optimizer,
    Probe,
    PTQConfig,
    RoundingConfig,
    WeightError,
)
from fxq.errors import (
    ConfigError,
    DataError,
    ExportMismatch,
    FxqError,
    GraphCheckFailed,
    ModelError,
    TraceFailed,
    UnsupportedOp,
)
from fxq.frontend.dynamo import backend
from fxq.frontend.trace import Frontend, trace
from fxq.io.artifact import Saved, load, save
from fxq.io.report import Report
from fxq.memory import keep_freed_memory
from fxq.pipeline import (
    Quantized,
    allocate,
    analyze,
    convert,
    label_free_hessian,
    passes,
    prepare,
    quantize,
    quantize_analyzed,
)
from fxq.quant.qmath import QSpec
from fxq.targets import INT8, ISA, W248A8, Target, host_isa

__all__ = [
    "quantize",
    "save",
    "load",
    "Saved",
    "backend",
    "compile_int8",
    "package_int8",
    "to_qdq_form",
    "export_onnx",
    "WeightStorage",
    "CheckLimits",
    "ExportCheck",
    "label_free_hessian",
    "analyze",
    "allocate",
    "quantize_analyzed",
    "prepare",
    "convert",
    "passes",
    "trace",
    "Quantized",
    "PTQConfig",
    "LFHConfig",
    "RoundingConfig",
    "MixedPrecisionConfig",
    "LossWeights",
    "Probe",
    "Optimizer",
    "Method",
    "ActThreshold",
    "WeightError",
    "Frontend",
    "Target",
    "ISA",
    "host_isa",
    "INT8",
    "W248A8",
    "QSpec",
    "Report",
    "keep_freed_memory",
    "FxqError",
    "TraceFailed",
    "UnsupportedOp",
    "ConfigError",
    "DataError",
    "ModelError",
    "GraphCheckFailed",
    "ExportMismatch",
]
