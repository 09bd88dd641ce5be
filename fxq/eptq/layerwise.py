"""Layer-local rounding: each quantized layer's codes chosen to minimise its own output error on its cached
inputs, as a start for the whole-network rounding optimization.

The codes come from GPTQ's column-by-column rounding with error feedback (Frantar et al. 2022, after Optimal
Brain Quantization): the weights are rounded one input column at a time, and each column's rounding error is
pushed onto the columns not yet rounded through the inverse of the layer's input second moment H = E[x x^T].
Here every weight keeps to the two grid points around it, floor(w/s) or floor(w/s) + 1, so the choice is one
that AdaRound's variables can hold and the whole-network optimization can start from and revise. With bias
correction the bias absorbs the mean of the output error, so H is the inputs' covariance instead.

A layer's cost is one pass over its inputs to accumulate H and one Cholesky factorisation: for a whole CNN, a
few forwards of the network, against hundreds for the whole-network optimization.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fxq.dist.world import World
from fxq.quant.modules import QuantWeight

__all__ = ["InputMoments", "supports", "layerwise_choice", "share_choices"]

POSITIONS = 256  # output positions per image whose patches enter H (whole rows, evenly spaced): plenty for a
# layer's few input columns, and the early layers' 12544 positions would make H cost more than the forward
BLOCK = 128  # columns rounded between two updates of the rest (GPTQ's lazy batch)
DAMPING = 0.01  # of H's mean diagonal, added to its diagonal (GPTQ's default): keeps the factorisation stable


def supports(layer: nn.Module) -> bool:
    """Layers whose input patches unfold: linear, and 2-d convolutions with zero padding the same on both sides
    (the others keep the float start)."""
    if isinstance(layer, nn.Linear):
        return True
    if not isinstance(layer, nn.Conv2d) or layer.padding_mode != "zeros":
        return False
    return layer.padding != "same" or all(d * (k - 1) % 2 == 0 for d, k in zip(layer.dilation, layer.kernel_size))


def _patches(layer: nn.Module, x: Tensor) -> Tensor:
    """The inputs each output position multiplies, as (groups, columns, positions): the columns in the order of
    weight.reshape(out, -1)'s rows within a group, the positions of all images side by side (one long product
    per group: a depthwise layer's many small ones run far below the machine's rate)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1]).t()[None]
    g, (n, c) = layer.groups, x.shape[:2]
    if layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.padding in ((0, 0), "valid"):
        views = x[:, :, :: _row_step(*x.shape[2:]), :, None, None]  # a 1x1 convolution's patches: its pixels
    elif layer.dilation == (1, 1):  # views of the padded input: the one copy is the reshape below
        padding = layer.padding if not isinstance(layer.padding, str) else _same_padding(layer)
        (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, padding
        views = F.pad(x, (pw, pw, ph, ph)).unfold(2, kh, sh).unfold(3, kw, sw)  # (n, c, ho, wo, kh, kw)
        views = views[:, :, :: _row_step(*views.shape[2:4])]
    else:
        padding = layer.padding if not isinstance(layer.padding, str) else _same_padding(layer)
        cols = F.unfold(x, layer.kernel_size, layer.dilation, padding, layer.stride)  # (n, c*kh*kw, positions)
        return cols.view(n, g, -1, cols.shape[2]).permute(1, 2, 0, 3).reshape(g, -1, n * cols.shape[2])
    per_group = views.unflatten(1, (g, c // g))  # (n, g, c/g, ho, wo, kh, kw)
    return per_group.permute(1, 2, 5, 6, 0, 3, 4).reshape(g, (c // g) * views.shape[4] * views.shape[5], -1)


def _row_step(rows: int, width: int) -> int:
    """Every how-many-th row of output positions to keep, for at most about POSITIONS per image."""
    return max(1, min(rows, math.ceil(rows * width / POSITIONS)))


def _same_padding(layer: nn.Conv2d) -> tuple[int, int]:
    """A string padding as numbers ('same' with an odd kernel extent: `supports` keeps the even ones out)."""
    if layer.padding == "valid":
        return (0, 0)
    return tuple(d * (k - 1) // 2 for d, k in zip(layer.dilation, layer.kernel_size))


class InputMoments:
    """Running sums of each layer's input patches and their outer products, fed by forward pre-hooks on the
    QuantWeight modules (so the inputs are the quantized graph's, activation quantization included)."""

    def __init__(self, layers: Sequence[QuantWeight]):
        self.layers = list(layers)
        self.outer: list[Tensor | None] = [None] * len(layers)
        self.total: list[Tensor | None] = [None] * len(layers)
        self.count = [0] * len(layers)
        self._hooks = [qw.register_forward_pre_hook(self._hook(i)) for i, qw in enumerate(layers) if supports(qw.layer)]

    def _hook(self, i: int):
        def record(module: QuantWeight, args: tuple) -> None:
            with torch.no_grad():
                cols = _patches(module.layer, args[0].detach().float())
                outer, total = torch.bmm(cols, cols.transpose(1, 2)), cols.sum(2)
                if self.outer[i] is None:
                    self.outer[i], self.total[i] = outer, total
                else:
                    self.outer[i] += outer
                    self.total[i] += total
                self.count[i] += cols.shape[2]

        return record

    @torch.no_grad()
    def merge_(self, world: World) -> None:
        """Sums over every rank's images (a rank that saw none of a layer's inputs adds zeros)."""
        if world.solo:
            return
        for i, qw in enumerate(self.layers):
            if not supports(qw.layer):
                continue
            if self.outer[i] is None:
                groups = getattr(qw.layer, "groups", 1)
                cols = qw.layer.weight[0].numel()
                self.outer[i] = qw.layer.weight.new_zeros(groups, cols, cols, dtype=torch.float32)
                self.total[i] = qw.layer.weight.new_zeros(groups, cols, dtype=torch.float32)
            world.sum_(self.outer[i], "the layer-local start's moments")
            world.sum_(self.total[i], "the layer-local start's moments")
        self.count = [int(c) for c in world.sum_(torch.tensor(self.count), "the layer-local start's moments")]
        self.outer = [o if c else None for o, c in zip(self.outer, self.count)]
        self.total = [t if c else None for t, c in zip(self.total, self.count)]

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def hessian(self, i: int, centred: bool) -> Tensor | None:
        """E[x x^T] of layer i's input patches per group (the covariance when `centred`), None if never seen."""
        if self.outer[i] is None:
            return None
        n = self.count[i]
        h = self.outer[i] / n
        if centred:
            mean = self.total[i] / n
            h = h - mean.unsqueeze(2) * mean.unsqueeze(1)
        return h


def _damped(hessian: Tensor) -> Tensor:
    """H in float64 with DAMPING times its mean diagonal added (and 1 where an input never varied)."""
    h = hessian.double().clone()
    diag = h.diagonal(dim1=1, dim2=2)
    dead = diag <= 0  # inputs that were always zero: any code does; keep their columns out of the solve
    diag.add_(DAMPING * diag.clamp_min(0).mean(1, keepdim=True) + dead.double())
    return h


@torch.no_grad()
def layerwise_choice(qw: QuantWeight, hessian: Tensor, act_order: bool = True) -> Tensor:
    """For every weight of `qw`, 1 where its code is floor(w/s) + 1 and 0 where it is floor(w/s) (within the
    grid), chosen column by column with error feedback through `hessian` (groups, columns, columns).

    `act_order` rounds the columns of larger input energy first (GPTQ's heuristic: they can still pass their
    error to many columns)."""
    w = qw.layer.weight.detach().float()
    out, groups, cols = w.shape[0], hessian.shape[0], hessian.shape[1]
    step = qw.scale.detach().float().reshape(out, 1)
    w2 = w.reshape(out, -1)
    lower, free = (t.float().reshape(out, -1) for t in qw.rounding_bounds())
    # (groups, rows, columns): each group's output channels read only that group's columns
    shape = (groups, out // groups, cols)
    work, lo_g, hi_g = (t.reshape(shape).clone() for t in (w2, lower, lower + free))
    s = step.reshape(groups, out // groups, 1)
    h = _damped(hessian)
    diag = h.diagonal(dim1=1, dim2=2)
    order = torch.argsort(diag, dim=1, descending=True) if act_order else torch.arange(cols).expand(groups, -1)
    h = torch.take_along_dim(torch.take_along_dim(h, order.unsqueeze(2), 1), order.unsqueeze(1), 2)
    perm = order.unsqueeze(1).expand(shape)
    work, lo_g, hi_g = (torch.take_along_dim(t, perm, 2) for t in (work, lo_g, hi_g))
    # the upper Cholesky factor of H^-1: row j holds how column j's error spreads over the later columns
    inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    u = torch.linalg.cholesky(inv, upper=True).float()
    codes = torch.empty_like(work)
    for b0 in range(0, cols, BLOCK):  # GPTQ's lazy updates: columns past the block get the block's errors at once
        b1 = min(b0 + BLOCK, cols)
        block, errors = work[:, :, b0:b1], torch.empty_like(work[:, :, b0:b1])
        for j in range(b1 - b0):
            col = block[:, :, j]
            q = torch.minimum(torch.maximum(torch.round(col / s[:, :, 0]), lo_g[:, :, b0 + j]), hi_g[:, :, b0 + j])
            codes[:, :, b0 + j] = q
            errors[:, :, j] = err = (col - q * s[:, :, 0]) / u[:, b0 + j, b0 + j].unsqueeze(1)
            block[:, :, j + 1 :] -= err.unsqueeze(2) * u[:, b0 + j, b0 + j + 1 : b1].unsqueeze(1)
        work[:, :, b1:] -= torch.bmm(errors, u[:, b0:b1, b1:])
    codes = torch.empty_like(codes).scatter_(2, perm, codes)  # back to the weights' column order
    return (codes.reshape(out, -1) > lower).reshape(w.shape).to(w.dtype)


def share_choices(
    mine: list[Tensor | None], layers: Sequence[QuantWeight], present: list[bool], world: World
) -> list[Tensor | None]:
    """Every layer's choice on every rank, where the choice of layer i (one of the `present` ones, whose inputs
    were seen) was made by the rank that owns i (round-robin); the others stay None."""
    if world.solo:
        return mine
    owned = [[i for i in range(len(layers)) if present[i] and i % world.size == r] for r in range(world.size)]
    flat = [mine[i].reshape(-1).to(torch.uint8) for i in owned[world.rank]]
    parts = world.gather(torch.cat(flat) if flat else torch.empty(0, dtype=torch.uint8), "the layer-local start")
    out: list[Tensor | None] = [None] * len(layers)
    for ids, part in zip(owned, parts):
        for i, c in zip(ids, part.split([layers[i].layer.weight.numel() for i in ids])):
            w = layers[i].layer.weight
            out[i] = c.to(device=w.device, dtype=w.dtype).reshape(w.shape)
    return out
