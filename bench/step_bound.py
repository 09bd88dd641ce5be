"""The bound of one rounding step, shared by the bench scripts: a teacher forward (no grad) plus a student forward
and backward of the same batch, with fxq's own graphs (float graph, fake-quant graph). Imports little of fxq, so
that `--tree` runs of older commits can use it too."""

from __future__ import annotations

import statistics
import time

import torch

from fxq.eptq.train import use_training_kernels_


def _sync(x: torch.Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize()


def step_bound(model, qgm, x: torch.Tensor, repeat: int = 5) -> float:
    """Median seconds of teacher forward + student forward + backward on batch x (with the rounding's kernels)."""
    use_training_kernels_(qgm, True)
    params = [p for p in qgm.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(p.dim() == 1)  # biases: a backward through the whole graph, as in the rounding step
    times = []
    for _ in range(repeat + 1):
        _sync(x)
        t0 = time.perf_counter()
        with torch.no_grad():
            model(x)
        qgm(x).square().mean().backward()
        _sync(x)
        times.append(time.perf_counter() - t0)
    for p, f in zip(params, flags):
        p.requires_grad_(f)
        p.grad = None
    use_training_kernels_(qgm, False)
    return statistics.median(times[1:])
