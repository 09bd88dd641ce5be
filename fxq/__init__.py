"""fxq: post-training quantization compiler for PyTorch, as a torch.fx pass pipeline.

import fxq
qgm, report = fxq.quantize(model, calib_batches, fxq.PTQConfig(target=fxq.INT8.with_bits(weight_bits=4)))
"""

from fxq.backends.inductor import compile_int8, package_int8, to_qdq_form
from fxq.compile_backend import backend
from fxq.config import (
    ActThreshold,
    LFHConfig,
    LossWeights,
    Method,
    MixedPrecisionConfig,
    Probe,
    PTQConfig,
    RoundingConfig,
    WeightError,
)
from fxq.errors import ConfigError, DataError, FxqError, GraphCheckFailed, ModelError, TraceFailed, UnsupportedOp
from fxq.frontend import Frontend, trace
from fxq.pipeline import Quantized, analyze, convert, label_free_hessian, prepare, quantize, quantize_analyzed
from fxq.qmath import QSpec
from fxq.report import Report
from fxq.targets import INT8, W248A8, Target

__all__ = [
    "quantize",
    "backend",
    "compile_int8",
    "package_int8",
    "to_qdq_form",
    "label_free_hessian",
    "LFHConfig",
    "RoundingConfig",
    "LossWeights",
    "MixedPrecisionConfig",
    "analyze",
    "quantize_analyzed",
    "Probe",
    "prepare",
    "convert",
    "trace",
    "Quantized",
    "PTQConfig",
    "Method",
    "ActThreshold",
    "WeightError",
    "Frontend",
    "Target",
    "INT8",
    "W248A8",
    "QSpec",
    "Report",
    "FxqError",
    "TraceFailed",
    "UnsupportedOp",
    "ConfigError",
    "DataError",
    "ModelError",
    "GraphCheckFailed",
]
