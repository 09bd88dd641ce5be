"""The LFH hot loop's reduction: per-sample squared norms of gradients, folded into running statistics.

`sumsq_per_sample` reduces one gradient to per-sample sums of squares; `welford_update_` folds the (n_z, k)
matrix of one backward into every tensor's running mean and M2 at once, on the device, with no host sync per
tensor. `fused_update_reference_` is both steps for a list of gradients plus each tensor's relative move and
converged flag: the contract of the fused CUDA kernel (kernels/lfh_fused.cu), and its oracle in the tests.
`LFHReducer` is what the LFH pass drives from its backward hooks; it picks the kernel or the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "RunningStats",
    "FusedUpdate",
    "LFHReducer",
    "sumsq_per_sample",
    "welford_update_",
    "fold_",
    "fused_update_reference_",
    "lfh_update_",
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


def lfh_update_(stats: RunningStats, values: Tensor) -> None:
    """Fold one backward's (n_z, k) values into every row (kept for callers of the two-step path)."""
    welford_update_(stats, values)


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


@dataclass
class LFHReducer:
    """Per-tensor running statistics of one image batch, fed gradient by gradient from the backward hooks.

    Without `fused` (CPU, or no kernel) each gradient is reduced in its hook and dropped, and `finish` folds
    the (n_z, batch) matrix: memory grows with n_z only. With `fused` (the CUDA kernel) gradients wait in a
    list, so that one launch reduces many, and are flushed once they hold `flush_bytes` and at `finish`: the
    extra memory is capped. "auto" picks the kernel for CUDA devices when it builds (kernels/lfh_cuda.py).
    """

    n_z: int
    batch: int  # rows of every gradient: images x probes per pass
    device: torch.device
    min_count: int  # samples before a tensor may count as converged
    rel_tol: float
    flush_bytes: int = 256 << 20
    fused: FusedUpdate | None | Literal["auto"] = "auto"
    stats: RunningStats = field(init=False)
    moved: Tensor = field(init=False)  # (n_z,) float64: the last relative move of each running mean
    flags: Tensor = field(init=False)  # (n_z,) bool: converged
    _values: list[Tensor | None] = field(init=False, repr=False)
    _pending: list[tuple[int, Tensor]] = field(init=False, repr=False)
    _pending_bytes: int = field(init=False, repr=False, default=0)
    _seen: set[int] = field(init=False, repr=False)

    def __post_init__(self):
        self.device = torch.device(self.device)
        if self.fused == "auto":
            from fxq.kernels.lfh_cuda import fused_update_for  # lfh_cuda imports this module

            self.fused = fused_update_for(self.device)
        self.stats = RunningStats.zeros(self.n_z, self.device)
        self.moved = torch.full((self.n_z,), math.inf, dtype=torch.float64, device=self.device)
        self.flags = torch.zeros(self.n_z, dtype=torch.bool, device=self.device)
        self._values, self._pending, self._seen = [None] * self.n_z, [], set()

    def add(self, row: int, grad: Tensor) -> None:
        """Take interest tensor `row`'s gradient of this backward (returns None: a hook must not replace it)."""
        if row in self._seen:
            raise RuntimeError(f"lfh: interest tensor {row} received two gradients in one backward")
        self._seen.add(row)
        if self.fused is None:
            self._values[row] = sumsq_per_sample(grad)
            return
        self._pending.append((row, grad.detach()))
        self._pending_bytes += grad.numel() * grad.element_size()
        if self._pending_bytes >= self.flush_bytes:
            self._flush()

    def finish(self) -> None:
        """After each backward: fold what is left; a tensor the output does not depend on gets zeros."""
        if self.fused is None:
            zeros = torch.zeros(self.batch, device=self.device)
            values = torch.stack([v if v is not None else zeros for v in self._values])
            fold_(self.stats, torch.arange(self.n_z), values, self.moved, self.flags, self.min_count, self.rel_tol)
            self._values = [None] * self.n_z
        else:
            empty = torch.zeros(self.batch, 0, device=self.device)
            self._pending += [(row, empty) for row in range(self.n_z) if row not in self._seen]
            self._flush()
        self._seen.clear()

    def converged(self) -> bool:
        """Every running mean has settled (one host sync)."""
        return bool(self.flags.all())

    def _flush(self) -> None:
        if self._pending:
            rows = torch.tensor([r for r, _ in self._pending], dtype=torch.int64)
            grads = [g for _, g in self._pending]
            self.fused(grads, rows, self.stats, self.moved, self.flags, self.min_count, self.rel_tol)
        self._pending, self._pending_bytes = [], 0
