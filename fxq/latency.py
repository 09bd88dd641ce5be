"""Latency of float vs quantized models per backend (eager reference, ONNX Runtime), as same-run ratios."""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from torch import nn
from torch.fx import GraphModule

from fxq.onnx_export import OPSET, export_onnx

__all__ = ["time_call", "ort_session", "export_float_onnx", "backend_latencies"]


def time_call(fn: Callable[[], object], iters: int = 20, warmup: int = 3) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def ort_session(path: str, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or torch.get_num_threads()
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def export_float_onnx(model: nn.Module, example: torch.Tensor, path: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            path,
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )


def backend_latencies(
    model: nn.Module, qgm: GraphModule, image_size: int, batch_sizes=(1, 32), iters: int = 20
) -> list[dict]:
    """Rows of {backend, batch, float_ms, int8_ms, speedup}, float and quantized timed in the same run."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        f_path, q_path = os.path.join(tmp, "float.onnx"), os.path.join(tmp, "int8.onnx")
        example = torch.randn(1, 3, image_size, image_size)
        export_float_onnx(model, example, f_path)
        export_onnx(qgm, (example,), q_path)
        sf, sq = ort_session(f_path), ort_session(q_path)
        for b in batch_sizes:
            x = torch.randn(b, 3, image_size, image_size)
            with torch.no_grad():
                eager = (time_call(partial(model, x), iters), time_call(partial(qgm, x), iters))
            feed = {"input": x.numpy()}
            onnx = (time_call(partial(sf.run, None, feed), iters), time_call(partial(sq.run, None, feed), iters))
            for name, (tf, tq) in (("eager fake-quant (reference)", eager), ("onnxruntime QDQ int8", onnx)):
                rows.append(
                    {"backend": name, "batch": b, "float_ms": 1e3 * tf, "int8_ms": 1e3 * tq, "speedup": tf / tq}
                )
    return rows
