"""The LFH hot loop's reduction: per-sample squared norms of gradients, folded into running statistics.

`sumsq_per_sample` runs in each interest tensor's backward hook, so the gradient is dropped as soon as it
is reduced; `welford_update_` then folds the (n_z, k) matrix of one backward into every tensor's running
mean and M2 at once, on the device, with no host sync per tensor. These are the PyTorch references: CPU
runs use them and tests compare any fused kernel against them (one dispatch point: `lfh_update_`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RunningStats", "sumsq_per_sample", "welford_update_", "lfh_update_"]


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
    return g.detach().reshape(g.shape[0], -1).float().square().sum(1)


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


def lfh_update_(stats: RunningStats, values: Tensor) -> None:
    """The dispatch point: a fused CUDA kernel where one is built and the data is on a GPU, else the reference."""
    welford_update_(stats, values)
