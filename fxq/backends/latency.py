"""Latency of float vs quantized models per backend (eager reference, ONNX Runtime), as same-run ratios."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn
from torch.fx import GraphModule

from fxq.backends.inductor import FrozenCompiled, compile_int8
from fxq.backends.onnx import export_float_onnx, export_onnx, ort_session
from fxq.errors import ConfigError

__all__ = ["Timing", "time_samples", "time_call", "timing", "backend_latencies", "BACKENDS", "CPU_ONLY"]


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call over repeats (warm-up excluded): the median and the interquartile range."""

    median_ms: float
    iqr_ms: float
    repeats: int

    @classmethod
    def of(cls, seconds: list[float]) -> Timing:
        ms = 1e3 * np.asarray(seconds)
        q1, med, q3 = np.percentile(ms, [25, 50, 75])
        return cls(float(med), float(q3 - q1), len(ms))


def time_samples(fn: Callable[[], object], iters: int = 20, warmup: int = 3, device: torch.device | None = None):
    """Seconds of each of `iters` calls, after `warmup` untimed ones. On a CUDA device each call is timed by
    CUDA events around it (the GPU's time, not the launch's)."""
    for _ in range(warmup):
        fn()
    if device is not None and device.type == "cuda":
        return _cuda_samples(fn, iters, device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _cuda_samples(fn: Callable[[], object], iters: int, device: torch.device) -> list[float]:
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    torch.cuda.synchronize(device)
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 for start, end in pairs]


def time_call(fn: Callable[[], object], iters: int = 20, warmup: int = 3) -> float:
    """Median seconds per call."""
    return float(np.median(time_samples(fn, iters, warmup)))


def timing(fn: Callable[[], object], iters: int = 20, warmup: int = 3, device: torch.device | None = None) -> Timing:
    """Median and spread of `iters` calls of `fn`."""
    return Timing.of(time_samples(fn, iters, warmup, device))


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


CPU_ONLY = ("onnx", "inductor-int8")  # integer kernels of this build: ONNX Runtime's CPU provider, oneDNN


def backend_latencies(
    model: nn.Module,
    qgm: GraphModule,
    image_size: int,
    batch_sizes=(1, 32),
    iters: int = 20,
    backends=BACKENDS,
    device: torch.device = torch.device("cpu"),
) -> list[dict]:
    """Rows of {backend, batch, float_ms, float_iqr_ms, int8_ms, int8_iqr_ms, speedup, float_images_per_s,
    int8_images_per_s, eager_fp32_ms, repeats}: medians and interquartile ranges of `iters` calls after a warm-up,
    everything timed in the same run (CUDA events on a GPU)."""
    on_gpu = [b for b in backends if b in CPU_ONLY] if device.type == "cuda" else []
    if on_gpu:
        raise ConfigError(f"backend(s) {on_gpu} run on the CPU only; bench them with --device cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        runners = {b: _runners(b, model, qgm, image_size, tmp) for b in backends}
        for batch in batch_sizes:
            x = torch.randn(batch, 3, image_size, image_size, device=device)
            eager_fp32 = timing(partial(model, x), iters, device=device)
            for b, (run_float, run_quant) in runners.items():
                tf = timing(partial(run_float, x), iters, device=device)
                tq = timing(partial(run_quant, x), iters, device=device)
                rows.append(
                    {
                        "backend": _LABELS[b],
                        "batch": batch,
                        "float_ms": tf.median_ms,
                        "float_iqr_ms": tf.iqr_ms,
                        "int8_ms": tq.median_ms,
                        "int8_iqr_ms": tq.iqr_ms,
                        "speedup": tf.median_ms / tq.median_ms,
                        "float_images_per_s": 1e3 * batch / tf.median_ms,
                        "int8_images_per_s": 1e3 * batch / tq.median_ms,
                        "eager_fp32_ms": eager_fp32.median_ms,
                        "repeats": iters,
                    }
                )
    return rows
