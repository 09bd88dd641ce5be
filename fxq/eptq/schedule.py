"""The rounding optimization's schedule: which images each step sees, the regulariser's beta and V's learning rate.

Batches come from a stateless sampler (step -> images), so a resumed run sees the same batches as an
uninterrupted one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fxq.config import RoundingConfig

__all__ = ["batch_indices", "beta_at", "lr_rounding_at"]


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


def lr_rounding_at(step: int, cfg: RoundingConfig) -> float:
    """V's learning rate at `step`: lr_rounding during the warm-up, lr_rounding_hardening (if set) after it."""
    hardening = cfg.lr_rounding_hardening is not None and beta_at(step, cfg) is not None
    return cfg.lr_rounding_hardening if hardening else cfg.lr_rounding
