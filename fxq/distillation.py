"""The distillation loss: lambda-weighted squared errors of the interest tensors, packed into one matrix.

A batch's interest tensors travel packed as one [B, D] matrix whose columns hold each tensor's per-sample
values in turn. One copy packs the student's, the teacher's come packed from its cache, and the loss over
all n tensors takes a handful of kernels, forward and backward, instead of several per tensor: on a GPU at
batch 32 those launches, not the arithmetic, set a small model's step time.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pack", "column_lengths", "packed_loss", "distillation_loss"]


def pack(tensors: list[Tensor], nhwc: bool = False) -> Tensor:
    """The tensors of one batch side by side, [B, sum of per-sample sizes]. With `nhwc` a 4-d tensor is read
    channels-last, the order it lies in memory then, so packing a channels-last tensor is a plain copy."""
    return torch.cat([_rows(t, nhwc) for t in tensors], dim=1)


def column_lengths(tensors: list[Tensor]) -> Tensor:
    """Columns each tensor takes in `pack(tensors)`: its per-sample size."""
    return torch.tensor([t[0].numel() for t in tensors], dtype=torch.int64)


def packed_loss(zf: Tensor, zq: Tensor, lengths: Tensor, weights: Tensor, normalize: bool = True) -> Tensor:
    """(1/n) sum_z lambda_z * ||Z_f - Z_q||^2 per sample, relative to ||Z_f||^2 when `normalize`, for packed
    teacher `zf` and student `zq` ([B, D], columns split by `lengths`).

    `weights` [n], or [m, n] for m weightings of the same distances at once (then m losses)."""
    return _loss(zf, zq, lengths, len(zf), weights, normalize)


def distillation_loss(zf: list[Tensor], zq: list[Tensor], weights: Tensor, normalize: bool = True) -> Tensor:
    """`packed_loss` of tensor lists. Tensors whose first dimension is not a common batch size count per
    sample all the same: ||t||^2 / len(t)."""
    if len({len(t) for t in zf}) == 1:
        return packed_loss(pack(zf), pack(zq), column_lengths(zf), weights, normalize)
    # one row of everything; each tensor's squared norm then divides by its own first dimension
    flat_f, flat_q = (torch.cat([t.reshape(1, -1) for t in ts], dim=1).float() for ts in (zf, zq))
    lengths = torch.tensor([t.numel() for t in zf], dtype=torch.int64)
    samples = torch.tensor([float(len(t)) for t in zf], device=flat_f.device)
    return _loss(flat_f, flat_q, lengths, samples, weights, normalize)


def _loss(zf: Tensor, zq: Tensor, lengths: Tensor, samples: Tensor | int, weights: Tensor, normalize: bool) -> Tensor:
    # student minus teacher, in fp32 (an fp16 cache or bf16 targets convert inside the subtraction): its
    # gradient reaches the student without a negation pass
    err = _sample_energy(zq.float() - zf, lengths, samples)
    if normalize:
        err = err / _sample_energy(zf, lengths, samples).clamp_min(1e-12)
    return (weights.to(err.device) * err).mean(-1)


def _rows(t: Tensor, nhwc: bool) -> Tensor:
    if nhwc and t.dim() == 4:
        t = t.permute(0, 2, 3, 1)
    return t.reshape(len(t), -1)


def _sample_energy(z: Tensor, lengths: Tensor, samples: Tensor | int) -> Tensor:
    """Each packed tensor's squared norm over the batch, divided by its number of samples."""
    # column norms over the batch read z once and write nothing of its size (z.square().sum(0) writes a copy);
    # then segment sums over contiguous columns: one kernel, no atomics (unsafe: our lengths, no host check)
    columns = torch.linalg.vector_norm(z, dim=0, dtype=torch.float32)
    return torch.segment_reduce(columns.square(), "sum", lengths=lengths.to(z.device), unsafe=True) / samples
