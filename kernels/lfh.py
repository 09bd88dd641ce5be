"""The LFH reduction's one dispatch point: `LFHReducer`, which the LFH estimator drives from its backward hooks,
reduces with the fused CUDA kernel (kernels/lfh_cuda.py) where it builds for the device, else with the PyTorch
reference (kernels/lfh_reduce.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from fxq.kernels import lfh_cuda
from fxq.kernels.lfh_reduce import FusedUpdate, RunningStats, fold_, sumsq_per_sample

__all__ = ["LFHReducer"]


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
            self.fused = lfh_cuda.fused_update_for(self.device)
        self.stats = RunningStats.zeros(self.n_z, self.device)
        self.moved = torch.full((self.n_z,), math.inf, dtype=torch.float64, device=self.device)
        self.flags = torch.zeros(self.n_z, dtype=torch.bool, device=self.device)
        self._values, self._pending, self._seen = [None] * self.n_z, [], set()

    def add(self, row: int, grad: Tensor) -> None:
        """Take interest tensor `row`'s gradient of this backward (returns None: a hook must not replace it)."""
        if row in self._seen:
            raise RuntimeError(f"lfh: interest tensor {row} received two gradients in one backward")
        self._seen.add(row)
        if grad.dim() > 0 and grad.shape[0] != self.batch:
            # the batch folded into the leading dim with each image's rows together (windowed attention's
            # (images x windows, ...)): each image's share is one row of the (batch, -1) view
            if grad.shape[0] % self.batch:
                raise RuntimeError(
                    f"lfh: interest tensor {row}'s gradient has {grad.shape[0]} rows, not a multiple of the "
                    f"{self.batch} images x probes of the pass"
                )
            grad = grad.reshape(self.batch, -1)
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
