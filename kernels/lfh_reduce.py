"""The LFH hot loop's reduction: per-sample squared norms of gradients, folded into running statistics.

`sumsq_per_sample` reduces one gradient to per-sample sums of squares; `welford_update_` folds the (n_z, k)
matrix of one backward into every tensor's running mean and M2 at once, on the device, with no host sync per
tensor. `fused_update_reference_` is both steps for a list of gradients plus each tensor's relative move and
converged flag: the contract of the fused CUDA kernel (kernels/lfh_fused.cu), and its oracle in the tests.
kernels/lfh.py picks between the two.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "RunningStats",
    "FusedUpdate",
    "sumsq_per_sample",
    "welford_update_",
    "fold_",
    "merge_stats",
    "fused_update_reference_",
]


@dataclass
class RunningStats:
    """Welford state per interest tensor: count, mean and M2 of the per-sample values ||J_z^T v||^2."""

    count: Tensor  # (n_z,) float64
    mean: Tensor  # (n_z,) float64
    m2: Tensor  # (n_z,) float64

    @classmethod
    def zeros(cls, n: int, device: torch.device | str = "cpu") -> RunningStats:
        z = torch.zeros(n, dtype=torch.float64, device=device)
        return cls(z.clone(), z.clone(), z.clone())

    def variance(self) -> Tensor:
        return self.m2 / (self.count - 1).clamp_min(1)

    def stderr(self) -> Tensor:
        return (self.variance() / self.count.clamp_min(1)).sqrt()


def sumsq_per_sample(g: Tensor) -> Tensor:
    """(B, ...) gradient -> (B,) float32 sums of squares (accumulated in fp32 for fp16/bf16 inputs)."""
    return g.detach().reshape(g.shape[0], math.prod(g.shape[1:])).float().square().sum(1)  # (B, 0) -> zeros


def welford_update_(stats: RunningStats, values: Tensor) -> None:
    """Fold k new samples per tensor, values (n_z, k), into the running statistics (Chan et al. merge)."""
    v = values.to(torch.float64)
    k = v.shape[1]
    b_mean = v.mean(1)
    b_m2 = (v - b_mean[:, None]).square().sum(1)
    n = stats.count + k
    delta = b_mean - stats.mean
    stats.mean += delta * k / n
    stats.m2 += b_m2 + delta.square() * stats.count * k / n
    stats.count.copy_(n)


def merge_stats(parts: list[RunningStats]) -> RunningStats:
    """The statistics of the union of the parts' samples (Chan et al.'s parallel formula, all parts at once):
    n = sum n_i, mean = sum n_i mean_i / n, M2 = sum M2_i + n_i (mean_i - mean)^2. Parts with no samples add
    nothing."""
    count = torch.stack([p.count for p in parts]).sum(0)
    mean = torch.stack([p.count * p.mean for p in parts]).sum(0) / count.clamp_min(1)
    m2 = torch.stack([p.m2 + p.count * (p.mean - mean).square() for p in parts]).sum(0)
    return RunningStats(count, mean, m2)


def fold_(
    stats: RunningStats,
    rows: Tensor,
    values: Tensor,
    moved: Tensor,
    converged: Tensor,
    min_count: int,
    rel_tol: float,
) -> None:
    """Welford-fold values (len(rows), k) into `rows` of stats; set their relative move and converged flag.

    moved = |mean_new - mean_old| / max(|mean_new|, 1e-30); converged = count >= min_count and moved < rel_tol
    (NaN never converges). Rows not listed keep their state.
    """
    rows = rows.to(stats.count.device)
    sub = RunningStats(stats.count[rows], stats.mean[rows], stats.m2[rows])
    prev = sub.mean.clone()
    welford_update_(sub, values)
    stats.count[rows], stats.mean[rows], stats.m2[rows] = sub.count, sub.mean, sub.m2
    move = (sub.mean - prev).abs() / sub.mean.abs().clamp_min(1e-30)
    moved[rows] = move
    converged[rows] = (sub.count >= min_count) & (move < rel_tol)


def fused_update_reference_(
    grads: list[Tensor],
    rows: Tensor,
    stats: RunningStats,
    moved: Tensor,
    converged: Tensor,
    min_count: int,
    rel_tol: float,
) -> None:
    """The fused kernel's contract in PyTorch: grads[i] (B, ...) feeds stats row rows[i] (CPU int64, distinct).

    A (B, 0) gradient stands for a tensor the backward never reached: its B values are 0.
    """
    if not grads:
        return
    values = torch.stack([sumsq_per_sample(g).to(stats.count.device) for g in grads])
    fold_(stats, rows, values, moved, converged, min_count, rel_tol)


FusedUpdate = Callable[[list[Tensor], Tensor, RunningStats, Tensor, Tensor, int, float], None]
