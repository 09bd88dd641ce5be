"""Layer-local rounding: each quantized layer's codes chosen, in graph order, to bring its output on the inputs
the quantized graph gives it as near as it can to the float layer's output on the float graph's inputs, as a start
for the whole-network rounding optimization.

The codes come from GPTQ's column-by-column rounding with error feedback (Frantar et al. 2022, after Optimal
Brain Quantization): the weights are rounded one input column at a time, and each column's rounding error is
pushed onto the columns not yet rounded through the inverse of the layer's input second moment H = E[x x^T].
What is rounded is not the float weight W but W E[f x^T] H^-1, with f the float graph's input at the same place
(GPTAQ's asymmetric calibration, Li et al. 2025): the layer also makes up for the error its inputs carry from the
layers above, which have chosen already. Every weight keeps to the two grid points around its float value,
floor(w/s) or floor(w/s) + 1, so the choice is one that AdaRound's variables can hold and the whole-network
optimization can start from and revise. With bias correction the bias absorbs the mean of the output error, so
the moments are covariances instead. Each output position can weigh by how much the model output depends on the
layer there (`Sensitivity`): a transformer's head reads its class token alone, one row in each layer's ~200.

The graph runs once over the images, in stages (fxq.ir.frontier), the float graph beside it; a layer costs its
moments over its inputs and one Cholesky factorisation: for a whole CNN, about two forwards of the network,
against hundreds for the whole-network optimization.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule

from fxq.config import Probe
from fxq.dist.world import World
from fxq.eptq.lfh import probe, probe_points
from fxq.errors import GraphCheckFailed
from fxq.ir.frontier import Frontier
from fxq.ir.graph import call_sites, nodes_by_name
from fxq.ir.taps import with_taps
from fxq.quant.modules import QuantWeight

__all__ = [
    "Moments",
    "Sensitivity",
    "supports",
    "float_target",
    "layerwise_choice",
    "sequential_choices",
    "use_choice_",
    "harden_choice_",
]

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
    elif layer.dilation == (1, 1):
        views = _kept_row_views(layer, x)
    else:
        cols = F.unfold(x, layer.kernel_size, layer.dilation, _padding(layer), layer.stride)  # (n, c*kh*kw, positions)
        return cols.view(n, g, -1, cols.shape[2]).permute(1, 2, 0, 3).reshape(g, -1, n * cols.shape[2])
    per_group = views.unflatten(1, (g, c // g))  # (n, g, c/g, ho, wo, kh, kw)
    return per_group.permute(1, 2, 5, 6, 0, 3, 4).reshape(g, (c // g) * views.shape[4] * views.shape[5], -1)


def _position_weights(layer: nn.Module, weights: Tensor) -> Tensor:
    """Per-position `weights` in the order and at the positions `_patches` keeps, as (1, 1, positions)."""
    if isinstance(layer, nn.Linear) or layer.dilation != (1, 1):
        return weights.reshape(1, 1, -1)
    return weights[:, :: _row_step(*weights.shape[1:])].reshape(1, 1, -1)


def _kept_row_views(layer: nn.Conv2d, x: Tensor) -> Tensor:
    """The patches of the kept output rows (every _row_step-th) as views (n, c, rows, wo, kh, kw) of a copy of the
    input rows they read, zero-padded: the copy holds those rows alone, not the whole padded input (a depthwise
    layer's input is large beside its few columns)."""
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, _padding(layer)
    height, width = x.shape[2:]
    out_rows, out_cols = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
    kept = torch.arange(0, out_rows, _row_step(out_rows, out_cols), device=x.device)
    rows = (kept[:, None] * sh + torch.arange(kh, device=x.device) - ph).reshape(-1)  # the input rows read, padded
    inside = (rows >= 0) & (rows < height)
    read = x.index_select(2, rows.clamp(0, height - 1)).masked_fill_(~inside[:, None], 0)  # padding rows: 0
    read = F.pad(read, (pw, pw)).unflatten(2, (len(kept), kh))  # (n, c, rows, kh, width + 2 pw)
    return read.unfold(4, kw, sw).transpose(3, 4)  # (n, c, rows, wo, kh, kw)


def _row_step(rows: int, width: int) -> int:
    """Every how-many-th row of output positions to keep, for at most about POSITIONS per image."""
    return max(1, min(rows, math.ceil(rows * width / POSITIONS)))


def _padding(layer: nn.Conv2d) -> tuple[int, int]:
    """The layer's padding as numbers (a string: 'valid', or 'same' with an odd kernel extent, which `supports`
    requires)."""
    if not isinstance(layer.padding, str):
        return layer.padding
    if layer.padding == "valid":
        return (0, 0)
    return tuple(d * (k - 1) // 2 for d, k in zip(layer.dilation, layer.kernel_size))


class Moments:
    """Running sums of one layer's input patches in the quantized graph (x) and in the float graph (f), at the same
    positions of the same images: E[x x^T], E[f x^T] and their means, per group."""

    def __init__(self, layer: nn.Module):
        groups, cols = getattr(layer, "groups", 1), layer.weight[0].numel()
        new = functools.partial(torch.zeros, dtype=torch.float32, device=layer.weight.device)
        self.xx, self.fx = new(groups, cols, cols), new(groups, cols, cols)
        self.x, self.f = new(groups, cols), new(groups, cols)
        self.count = 0

    def add_(self, layer: nn.Module, x: Tensor, f: Tensor, weights: Tensor | None = None) -> None:
        """The patches of a batch's quantized input `x` and float input `f`, each output position weighted by
        `weights` (the layer output's shape without its channels: (images, rows, columns), or a linear layer's
        leading dimensions) where given, and alike otherwise."""
        px, pf = _patches(layer, x.float()), _patches(layer, f.float())
        w = None if weights is None else _position_weights(layer, weights.float())
        wx, wf = (px, pf) if w is None else (px * w, pf * w)
        self.xx.baddbmm_(wx, px.transpose(1, 2))
        self.fx.baddbmm_(wf, px.transpose(1, 2))
        self.x += wx.sum(2)
        self.f += wf.sum(2)
        self.count += px.shape[2] if w is None else float(w.sum())

    def merge_(self, world: World) -> None:
        """Sums over every rank's images."""
        if world.solo:
            return
        for t in (self.xx, self.fx, self.x, self.f):
            world.sum_(t, "the layer-local start's moments")
        count = torch.tensor([float(self.count)], dtype=torch.float64)
        self.count = float(world.sum_(count, "the layer-local start's moments"))

    def hessian(self, centred: bool) -> Tensor:
        """E[x x^T] of the quantized input's patches (their covariance when `centred`)."""
        return self._moment(self.xx, self.x, centred)

    def cross(self, centred: bool) -> Tensor:
        """E[f x^T] between the float and the quantized input's patches (centred: each about its own mean)."""
        return self._moment(self.fx, self.f, centred)

    def _moment(self, outer: Tensor, left: Tensor, centred: bool) -> Tensor:
        """In float64: the centring subtracts two near-equal terms where the inputs are far from zero."""
        n = self.count
        m = outer.double() / n
        return m - (left.double() / n).unsqueeze(2) * (self.x.double() / n).unsqueeze(1) if centred else m


def _damped(hessian: Tensor) -> Tensor:
    """H in float64 with DAMPING times its mean diagonal added (and 1 where an input never varied)."""
    h = hessian.double().clone()
    diag = h.diagonal(dim1=1, dim2=2)
    dead = diag <= 0  # inputs that were always zero: any code does; keep their columns out of the solve
    diag.add_(DAMPING * diag.clamp_min(0).mean(1, keepdim=True) + dead.double())
    return h


def _inverse_factor(h: Tensor) -> Tensor:
    """The upper Cholesky factor of H^-1 (row j: how column j's error spreads over the later columns). Where the
    moments' float32 sums leave H short of positive definite (a near-constant input: a class token), the damping
    grows tenfold until it factors."""
    extra = h.diagonal(dim1=1, dim2=2).abs().mean(1)[:, None] * DAMPING
    for _ in range(_RETRIES):
        lower, info = torch.linalg.cholesky_ex(h)
        if not info.any():
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if not info.any():
                return upper
        h = h.clone()
        h.diagonal(dim1=1, dim2=2).add_(extra)
        extra = extra * 10
    raise GraphCheckFailed("layer-local start: a layer's input moments do not factor even damped; use start='float'")


_RETRIES = 6  # tenfold damping steps before the layer-local start gives up on a layer


@torch.no_grad()
def float_target(qw: QuantWeight, hessian: Tensor, cross: Tensor) -> Tensor:
    """The weights whose output on the quantized inputs comes nearest, in the mean square, to the float layer's
    on the float inputs: W E[f x^T] H^-1 with H = E[x x^T], per group. Written W + W (E[f x^T] - H) H^-1 and
    solved with H damped as the choice damps it, so that where the inputs carry no error the target is W itself
    (the damping shrinks only the correction). Rounding it against H minimises E||W f - W_q x||^2, the layer's
    error against the float graph, its inputs' error included."""
    w = qw.layer.weight.detach()
    groups = hessian.shape[0]
    rows = w.reshape(groups, w.shape[0] // groups, -1).double()
    drift = rows @ (cross.double() - hessian.double())  # W (E[f x^T] - E[x x^T])
    correction = torch.linalg.solve(_damped(hessian), drift.transpose(1, 2)).transpose(1, 2)  # H symmetric
    return (rows + correction).reshape(w.shape).to(w.dtype)


@torch.no_grad()
def layerwise_choice(
    qw: QuantWeight, hessian: Tensor, target: Tensor | None = None, act_order: bool = True, sweeps: int = 0
) -> Tensor:
    """For every weight of `qw`, 1 where its code is floor(w/s) + 1 and 0 where it is floor(w/s) (within the
    grid), chosen column by column with error feedback through `hessian` (groups, columns, columns), to round
    `target` (default: the float weights; the two codes stay those around the float weight either way).

    `act_order` rounds the columns of larger input energy first (GPTQ's heuristic: they can still pass their
    error to many columns). `sweeps` passes of coordinate descent follow (`_descend`)."""
    w = qw.layer.weight.detach().float()
    out, groups, cols = w.shape[0], hessian.shape[0], hessian.shape[1]
    step = qw.scale.detach().float().reshape(out, 1)
    w2 = (w if target is None else target.float()).reshape(out, -1)
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
    u = _inverse_factor(h).float()
    aimed = work.clone()  # the error feedback rewrites `work`; the descent measures against the target itself
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
    if sweeps:
        codes = _descend(aimed, codes, lo_g, hi_g, s, h.float(), sweeps)
    codes = torch.empty_like(codes).scatter_(2, perm, codes)  # back to the weights' column order
    return (codes.reshape(out, -1) > lower).reshape(w.shape).to(w.dtype)


def _descend(target: Tensor, codes: Tensor, lo: Tensor, hi: Tensor, step: Tensor, h: Tensor, sweeps: int) -> Tensor:
    """`codes` (groups, rows, columns), each between `lo` and `hi`, moved one weight at a time to its other code
    wherever that lowers its row's error (t - q s) H (t - q s)^T against `target` t, column after column, for
    `sweeps` passes or until a pass moves none (coordinate descent after GPTQ, as CDQuant does). A move of weight j
    by d steps s changes the error by -2 d s (e H)_j + d^2 s^2 H_jj, e the row's error: error feedback chose each
    column against the columns before it; this revisits each against all the others' final codes."""
    s, diag = step[:, :, 0], h.diagonal(dim1=1, dim2=2)
    for _ in range(sweeps):
        grad = torch.bmm(target - codes * step, h)  # (e H) of every row, again each pass: no drift from the updates
        moved = 0
        for j in range(codes.shape[2]):
            q = codes[:, :, j]
            shift = torch.where(q > lo[:, :, j], -s, s)  # to the other code of the two (the upper where both are lo)
            gain = shift * (shift * diag[:, j : j + 1] - 2 * grad[:, :, j])
            flip = (gain < 0) & (hi[:, :, j] > lo[:, :, j])
            if bool(flip.any()):
                shift = shift * flip
                codes[:, :, j] += shift / s
                grad -= shift.unsqueeze(2) * h[:, j].unsqueeze(1)
                moved += int(flip.sum())
        if not moved:
            break
    return codes


@dataclass(frozen=True)
class Sensitivity:
    """How the output positions of a layer weigh in its layer-local objective: a `share` of the weight follows the
    model output's sensitivity to the layer's output at each position, the rest is spread alike. The sensitivity
    is the label-free Hessian's diagonal there summed over the channels, E_v sum_c (J^T v)_c^2, from `probes`
    Rademacher probes on the model output (seeded seeds[k] for batch k: each batch gets its probes wherever it
    runs). Where the output reads a few positions of a layer (a transformer's class token), uniform weights
    spend the layer's error budget on positions that do not reach it."""

    share: float
    probes: int
    seeds: tuple[int, ...]


@torch.no_grad()
def sequential_choices(
    student: GraphModule,
    teacher: GraphModule,
    layers: Sequence[QuantWeight],
    batches: list[Tensor],
    world: World,
    sensitivity: Sensitivity | None = None,
    aim: bool = True,
    sweeps: int = 0,
) -> list[Tensor | None]:
    """Each of `layers`' choice, made in graph order on `batches` (this rank's share of the images): a layer's
    quantized inputs come from the layers above it at their choices (the graph's other layers computing as they
    are), and it rounds its `float_target` (with `aim`; otherwise its float weights), its output positions weighted
    by `sensitivity` (alike where None), with `sweeps` passes of coordinate descent after the error feedback. A
    layer called at several sites decides at its last, on the inputs of all of them. Layers whose patches do not
    unfold (`supports`) get None (they keep the float start, and their round-to-nearest weights meanwhile)."""
    teacher_nodes = nodes_by_name(teacher)
    sites = {
        name: ns for name, ns in call_sites(student).items() if isinstance(student.get_submodule(name), QuantWeight)
    }
    missing = [ns[0].name for ns in sites.values() if any(n.name not in teacher_nodes for n in ns)]
    if missing:
        raise GraphCheckFailed(f"layer-local start: the float graph lacks the layer calls {missing[:3]}")
    weights: list[dict[str, Tensor]] = [{} for _ in batches]
    if sensitivity is not None and sensitivity.share > 0:
        channel = {
            n.name: -1 if isinstance(student.get_submodule(name).layer, nn.Linear) else 1
            for name, ns in sites.items()
            if supports(student.get_submodule(name).layer)
            for n in ns
        }
        tapped = with_taps(teacher, [teacher_nodes[n] for n in channel])  # (output, each layer's value)
        weights = [
            _position_weights_of(tapped, channel, x, sensitivity, seed) for x, seed in zip(batches, sensitivity.seeds)
        ]
    index = {qw: i for i, qw in enumerate(layers)}
    remedy = "start the rounding from fewer images (RoundingConfig.start_images) or from the float weights"
    quantized, float_ = (Frontier(gm, batches, remedy) for gm in (student, teacher))
    moments: dict[int, Moments] = {}
    choices: list[Tensor | None] = [None] * len(layers)
    undecided = {qw for qw in layers if supports(qw.layer)}
    try:
        for node in sorted((n for ns in sites.values() for n in ns), key=quantized.index.__getitem__):
            if not undecided:  # the graph past the last of `layers` is not needed
                break
            qw, twin = student.get_submodule(node.target), teacher_nodes[node.name]
            quantized.advance_to(node)
            float_.advance_to(twin)
            if qw not in index or not supports(qw.layer):
                continue
            m = moments.setdefault(index[qw], Moments(qw.layer))
            for k in range(len(batches)):
                x, f = quantized.values_of(k, node.args[:1]) + float_.values_of(k, twin.args[:1])
                m.add_(qw.layer, x, f, weights[k].get(node.name))
            if node is sites[node.target][-1]:
                choices[index[qw]] = _choose(qw, moments.pop(index[qw]), index[qw], world, aim, sweeps)
                use_choice_(qw, choices[index[qw]])
                undecided.discard(qw)
    finally:
        for qw in layers:
            qw.live = None
    return choices


SENSITIVITY_CHUNK = 8  # images per forward and backward of the sensitivity probes (the graph of a chunk is held)


@torch.enable_grad()
def _position_weights_of(
    tapped: GraphModule, channel: dict[str, int], batch: Tensor, sensitivity: Sensitivity, seed: int
) -> dict[str, Tensor]:
    """For each node named in `channel` (mapped to its value's channel dimension; `tapped` returns the model output
    and their values, in that order): the weight of each of its output positions in `batch`, (1 - share) + share *
    s / mean(s) with s the sensitivity there (`Sensitivity`), 1 throughout where the output does not depend on
    the node."""
    gen = torch.Generator().manual_seed(seed)
    parts: dict[str, list[Tensor]] = {n: [] for n in channel}
    for chunk in batch.split(SENSITIVITY_CHUNK):
        out, *tapped_values = tapped(chunk.detach().requires_grad_(True))
        outs, values = probe_points(out, len(chunk)), dict(zip(channel, tapped_values))
        sums = {n: torch.zeros_like(v.detach().select(channel[n], 0)) for n, v in values.items()}
        # a value computed from constants alone (a table of relative positions) has no gradient: it stays uniform
        live = [n for n, v in values.items() if v.requires_grad]
        for _ in range(sensitivity.probes if live else 0):
            probed = sum((o * probe(o.shape, Probe.RADEMACHER, gen, o.device)).sum() for o in outs)
            grads = torch.autograd.grad(probed, [values[n] for n in live], retain_graph=True, allow_unused=True)
            for n, g in zip(live, grads):
                if g is not None:  # None: the output does not read this value
                    sums[n] += g.square().sum(channel[n])
        for n in channel:
            parts[n].append(sums[n])
    weights = {}
    for n, chunks in parts.items():
        s = torch.cat(chunks).float()
        relative = s / s.mean() if s.mean() > 0 else torch.ones_like(s)
        weights[n] = (1 - sensitivity.share) + sensitivity.share * relative
    return weights


def _choose(qw: QuantWeight, moments: Moments, i: int, world: World, aim: bool, sweeps: int) -> Tensor:
    """Layer i's choice on the moments of every rank's images (rounding its float target with `aim`, its float
    weights otherwise): made by the rank that owns i, sent to the rest."""
    moments.merge_(world)
    centred = qw.input_mean is not None  # bias correction takes the mean error: the covariances are what is left
    h = moments.hessian(centred)
    target = float_target(qw, h, moments.cross(centred)) if aim else None
    mine = layerwise_choice(qw, h, target, sweeps=sweeps) if world.owns(i) else None
    if world.solo:
        return mine
    # both in the weights' logical layout (a channels-last zeros_like would add up other elements)
    w = qw.layer.weight
    mine = mine.contiguous() if mine is not None else torch.zeros(w.shape, dtype=w.dtype, device=w.device)
    return world.sum_(mine, "the layer-local start")


def use_choice_(qw: QuantWeight, choice: Tensor) -> None:
    """The layer computes with the weights of `choice` (and their bias correction) until its `live` is reset."""
    codes = _codes(qw, choice)
    weight = (codes * qw.scale_like(codes)).to(qw.layer.weight.dtype)
    qw.live = (weight, qw.bias_for(weight))


def harden_choice_(qw: QuantWeight, choice: Tensor | None) -> None:
    """The layer's weight becomes the codes of `choice` (round-to-nearest's where None) for good, its bias the
    float one corrected for them."""
    qw.harden_to_(qw.hard_codes() if choice is None else _codes(qw, choice), qw.uncorrected_bias())


def _codes(qw: QuantWeight, choice: Tensor) -> Tensor:
    """The integer codes of a choice: floor(w/s), plus 1 where it chose the upper and the upper is on the grid."""
    lower, free = qw.rounding_bounds()
    return lower + free * choice
