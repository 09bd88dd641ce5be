"""The rounding optimization's schedule: which images each step sees, and the regulariser's beta.

Batches come from a stateless sampler (step -> images), so a resumed run sees the same batches as an
uninterrupted one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fxq.config import RoundingConfig

__all__ = ["batch_indices", "beta_at"]


def batch_indices(n: int, batch: int, step: int, seed: int) -> Tensor:
    """The images of step `step`: epochs of seeded permutations, a pure function of its arguments."""
    per_epoch = max(n // batch, 1)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    if n < batch:
        perm = perm.repeat(math.ceil(batch / n))
    return perm[k * batch : (k + 1) * batch]


def beta_at(step: int, cfg: RoundingConfig) -> float | None:
    """The regulariser's beta at `step`, or None during the warm-up (regulariser off)."""
    start = int(cfg.warmup * cfg.iterations)
    if step < start:
        return None
    frac = (step - start) / max(cfg.iterations - start, 1)
    return cfg.beta[0] + (cfg.beta[1] - cfg.beta[0]) * frac
