"""The distillation loss: lambda-weighted squared errors of the interest tensors, in one packed matrix.

A batch's interest tensors are compared packed, as one [B, D] matrix whose columns hold each tensor's
per-sample values in turn. The teacher's come packed from its cache; the student's are packed, subtracted
and reduced by one hand-written autograd function, so the loss over all n tensors takes a handful of
kernels, forward and backward, instead of several per tensor (on a GPU at batch 32 those launches, not the
arithmetic, set a small model's step time). A `Workspace` keeps the packed matrix between steps: on a CPU a
fresh buffer of that size each step costs more in page faults than the arithmetic on it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fxq.data.evaluate import kl_per_image

__all__ = ["pack", "column_lengths", "row_energies", "packed_loss", "distillation_loss", "softmax_kl", "Workspace"]


def pack(tensors: list[Tensor], nhwc: bool = False, batch: int | None = None) -> Tensor:
    """The tensors of one batch side by side, [B, sum of per-sample sizes]. With `nhwc` a 4-d tensor is read
    channels-last, the order it lies in memory then, so packing a channels-last tensor is a plain copy.

    `batch`: B, when a tensor folds it into its first dimension with each image's rows together (windowed
    attention's (images x windows, ...)): each image's row is then its rows side by side. Without it every
    tensor's first dimension is the batch."""
    return torch.cat([_rows(t, nhwc, batch) for t in tensors], dim=1)


def column_lengths(tensors: list[Tensor], batch: int | None = None) -> Tensor:
    """Columns each tensor takes in `pack(tensors, batch=batch)`: its per-sample size."""
    return torch.tensor([t.numel() // (batch or len(t)) for t in tensors], dtype=torch.int64)


def row_energies(z: Tensor, lengths: Tensor) -> Tensor:
    """||t||^2 of each packed tensor t in each row of z, [B, n] in fp32."""
    return torch.stack([block.float().square().sum(1) for block in z.split(lengths.tolist(), dim=1)], dim=1)


class Workspace:
    """The fp32 matrix the student's tensors are packed into, kept from one step to the next."""

    def __init__(self):
        self._buffer: Tensor | None = None

    def get(self, rows: int, columns: int, device: torch.device) -> Tensor:
        b = self._buffer
        if b is None or b.shape != (rows, columns) or b.device != device:
            self._buffer = b = torch.empty(rows, columns, device=device)
        return b


def packed_loss(
    zf: Tensor,
    zq: list[Tensor],
    lengths: Tensor,
    weights: Tensor,
    normalize: bool = True,
    zf_energy: Tensor | None = None,
    nhwc: bool = False,
    workspace: Workspace | None = None,
    samples: int | None = None,
) -> Tensor:
    """(1/n) sum_z lambda_z * ||Z_f - Z_q||^2 per sample, relative to ||Z_f||^2 when `normalize`: the packed
    teacher `zf` ([B, D], columns split by `lengths`) against the student's tensors `zq` (packed as `pack(zq,
    nhwc)` would), differentiable in `zq`.

    `weights` [n], or [m, n] for m weightings of the same distances at once (then m losses). `zf_energy` [n]:
    the teacher's ||Z_f||^2 per sample when known already (`row_energies` of a cache's rows, averaged).
    `samples`: the batch the loss is a mean over when these B rows are only a part of it (a rank's part of a
    data-parallel batch: the parts' losses then add up to the batch's); it needs `zf_energy` of the whole batch."""
    columns = _PackedSquaredError.apply(zf, _Rows(nhwc, batched=True, batch=len(zf)), workspace, *zq)
    return _loss(columns, zf, lengths, samples or len(zf), weights, normalize, zf_energy)


def distillation_loss(zf: list[Tensor], zq: list[Tensor], weights: Tensor, normalize: bool = True) -> Tensor:
    """`packed_loss` of tensor lists. Tensors whose first dimension is not a common batch size count per
    sample all the same: ||t||^2 / len(t)."""
    if len({len(t) for t in zf}) == 1:
        return packed_loss(pack(zf), zq, column_lengths(zf), weights, normalize)
    # one row of everything; each tensor's squared norm then divides by its own first dimension
    flat = torch.cat([t.reshape(1, -1) for t in zf], dim=1)
    lengths = torch.tensor([t.numel() for t in zf], dtype=torch.int64)
    samples = torch.tensor([float(len(t)) for t in zf], device=flat.device)
    columns = _PackedSquaredError.apply(flat, _Rows(False, batched=False), None, *zq)
    return _loss(columns, flat, lengths, samples, weights, normalize)


def _loss(columns, zf, lengths, samples, weights, normalize, zf_energy=None) -> Tensor:
    err = _segment_sums(columns, lengths) / samples
    if normalize:
        if zf_energy is None:
            f = zf.float()
            zf_energy = _segment_sums(torch.linalg.vecdot(f, f, dim=0), lengths) / samples
        err = err / zf_energy.clamp_min(1e-12)
    return (weights.to(err.device) * err).mean(-1)


def softmax_kl(teacher: Tensor, student: Tensor, samples: int | None = None) -> Tensor:
    """KL(softmax(teacher) || softmax(student)) summed over the rows of the [B, classes] logits and divided by
    `samples` (B when None; the whole batch's size when these rows are a rank's part of it), in fp32,
    differentiable in `student`."""
    each = kl_per_image(student.float().log_softmax(1), teacher.float().log_softmax(1))
    return each.sum() / (samples or len(teacher))


class _Rows:
    """How a tensor lies in the packed matrix, and back: per sample (batched, `batch` rows; channels-last with
    `nhwc`) or whole, as one row."""

    def __init__(self, nhwc: bool, batched: bool, batch: int | None = None):
        self.nhwc, self.batched, self.batch = nhwc, batched, batch

    def __call__(self, t: Tensor) -> Tensor:
        return _rows(t, self.nhwc, self.batch) if self.batched else t.reshape(1, -1)

    def back(self, block: Tensor, shape: torch.Size) -> Tensor:
        """A [rows, columns] block of the packed matrix as that tensor's `shape` (a view, unless the tensor
        folds the batch into its first dimension)."""
        if not self.batched:
            return block.view(shape)
        if shape[0] != len(block):
            return block.reshape(shape)
        if self.nhwc and len(shape) == 4:
            return block.unflatten(1, (shape[2], shape[3], shape[1])).permute(0, 3, 1, 2)
        return block.unflatten(1, shape[1:])


class _PackedSquaredError(torch.autograd.Function):
    """sum_b (Z_q - Z_f)[b, d]^2 for every column d of the packed matrices, in fp32, differentiable in the
    student's tensors. Forward: one copy packs them (into the workspace when given), one pass subtracts in
    place, one reduces; backward: one pass, whose blocks are the tensors' gradients (views)."""

    @staticmethod
    def forward(ctx, zf: Tensor, rows: _Rows, workspace: Workspace | None, *zq: Tensor) -> Tensor:
        blocks = [rows(t) for t in zq]
        shape = (len(zf), sum(b.shape[1] for b in blocks))
        d = workspace.get(*shape, zf.device) if workspace is not None else torch.empty(shape, device=zf.device)
        torch.cat(blocks, dim=1, out=d)
        d.sub_(zf)  # an fp16 cache or bf16 targets convert inside the subtraction
        ctx.save_for_backward(d)  # its version guards against a second forward overwriting the workspace
        ctx.rows, ctx.widths, ctx.tensors = rows, [b.shape[1] for b in blocks], [(t.shape, t.dtype) for t in zq]
        return torch.linalg.vecdot(d, d, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (d,) = ctx.saved_tensors
        g = d.mul_(2 * grad)  # d is not needed after this: its memory becomes the gradient
        blocks = g.split(ctx.widths, dim=1)
        grads = [ctx.rows.back(b, shape).to(dtype) for b, (shape, dtype) in zip(blocks, ctx.tensors)]
        return None, None, None, *grads


def _rows(t: Tensor, nhwc: bool, batch: int | None = None) -> Tensor:
    rows = batch or len(t)
    if nhwc and t.dim() == 4 and len(t) == rows:
        t = t.permute(0, 2, 3, 1)
    return t.reshape(rows, -1)


def _segment_sums(columns: Tensor, lengths: Tensor) -> Tensor:
    """Sums over runs of contiguous columns: one kernel, no atomics (unsafe: our lengths, no host check)."""
    return torch.segment_reduce(columns, "sum", lengths=lengths.to(columns.device), unsafe=True)
