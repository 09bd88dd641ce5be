"""Latency of float vs quantized models per backend (eager reference, ONNX Runtime), as same-run ratios."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from torch import nn
from torch.fx import GraphModule

from fxq.backends.inductor import FrozenCompiled, compile_int8
from fxq.backends.onnx import export_float_onnx, export_onnx, ort_session

__all__ = ["time_samples", "time_call", "backend_latencies", "BACKENDS"]


def time_samples(fn: Callable[[], object], iters: int = 20, warmup: int = 3) -> list[float]:
    """Seconds of each of `iters` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def time_call(fn: Callable[[], object], iters: int = 20, warmup: int = 3) -> float:
    """Median seconds per call."""
    return float(np.median(time_samples(fn, iters, warmup)))


BACKENDS = ("eager", "onnx", "inductor", "inductor-int8")
_LABELS = {
    "eager": "eager fake-quant (reference)",
    "onnx": "onnxruntime QDQ int8",
    "inductor": "inductor (fake-quant)",
    "inductor-int8": "inductor int8 (oneDNN)",
}


def _runners(backend: str, model: nn.Module, qgm: GraphModule, image_size: int, tmp: str) -> tuple[Callable, Callable]:
    """(float, quantized) callables of one backend, each taking a batch tensor."""
    if backend == "eager":
        return model, qgm
    if backend == "inductor":  # the export path: the fxq graph handed to Inductor as is
        return torch.compile(model, dynamic=False), torch.compile(qgm, dynamic=False)
    if backend == "inductor-int8":  # integer kernels; the float side frozen too, so both get packed weights
        return FrozenCompiled(model), compile_int8(qgm)
    f_path, q_path = os.path.join(tmp, "float.onnx"), os.path.join(tmp, "int8.onnx")
    example = torch.randn(2, 3, image_size, image_size)
    export_float_onnx(model, (example,), f_path)
    export_onnx(qgm, (example,), q_path)
    sf, sq = ort_session(f_path), ort_session(q_path)
    return (lambda x: sf.run(None, {"input": x.numpy()})), (lambda x: sq.run(None, {"input": x.numpy()}))


def backend_latencies(
    model: nn.Module, qgm: GraphModule, image_size: int, batch_sizes=(1, 32), iters: int = 20, backends=BACKENDS
) -> list[dict]:
    """Rows of {backend, batch, float_ms, int8_ms, speedup, eager_fp32_ms}; everything timed in the same run."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        runners = {b: _runners(b, model, qgm, image_size, tmp) for b in backends}
        for batch in batch_sizes:
            x = torch.randn(batch, 3, image_size, image_size)
            eager_fp32 = time_call(partial(model, x), iters)
            for b, (run_float, run_quant) in runners.items():
                tf, tq = time_call(partial(run_float, x), iters), time_call(partial(run_quant, x), iters)
                rows.append(
                    {
                        "backend": _LABELS[b],
                        "batch": batch,
                        "float_ms": 1e3 * tf,
                        "int8_ms": 1e3 * tq,
                        "speedup": tf / tq,
                        "eager_fp32_ms": 1e3 * eager_fp32,
                    }
                )
    return rows
