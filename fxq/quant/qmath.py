"""Quantizer math: integer grids, scales from thresholds, and error-minimising threshold search.

Convention (MCT's): a symmetric quantizer of b bits with threshold t has step
s = t / 2^(b-1) and integer range [-2^(b-1), 2^(b-1) - 1] when signed, s = t / 2^b and [0, 2^b - 1]
when unsigned. The threshold itself is therefore just outside the largest representable value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import Enum

import torch
from torch import Tensor

from fxq.errors import ConfigError

__all__ = [
    "QSpec",
    "ActThreshold",
    "WeightError",
    "MIN_BITS",
    "MAX_BITS",
    "scale_for",
    "fake_quant",
    "fake_quant_values",
    "fake_quant_trained_input",
    "fake_quant_learned_step",
    "drop_quantization",
    "quantize_int",
    "weight_thresholds",
    "activation_threshold",
]

MIN_BITS, MAX_BITS = 2, 8
# the smallest threshold: a tensor that is all zeros still needs a positive step. Far below any live tensor's
# range (the search works in units of each tensor's own range, so a tensor of 1e-20 is searched like one of 1)
_TINY = 1e-30


@dataclass(frozen=True)
class QSpec:
    """How one tensor is quantized: bits, signedness, per output channel or per tensor, PoT thresholds.

    `bits` is the width the value is stored in; `max_grid_bits` caps the grid it takes within that width, for
    devices whose kernels compute exactly only on a narrower one (fxq.targets.ISA): an 8-bit weight on a 7-bit
    grid uses codes [-64, 63] and step t / 64.
    """

    bits: int
    signed: bool = True
    per_channel: bool = False
    pot: bool = False
    max_grid_bits: int = MAX_BITS

    def __post_init__(self):
        if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {self.bits!r}")
        if not isinstance(self.max_grid_bits, int) or not MIN_BITS <= self.max_grid_bits <= MAX_BITS:
            raise ConfigError(
                f"max_grid_bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {self.max_grid_bits!r}"
            )

    @property
    def grid_bits(self) -> int:
        """The width of the integer grid: `bits`, or less where the device caps it."""
        return min(self.bits, self.max_grid_bits)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.grid_bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.grid_bits - 1) - 1 if self.signed else 2**self.grid_bits - 1

    @property
    def levels_per_threshold(self) -> int:
        """t / s: how many steps fit in one threshold."""
        return 2 ** (self.grid_bits - 1) if self.signed else 2**self.grid_bits

    def with_bits(self, bits: int) -> QSpec:
        return replace(self, bits=bits)


class ActThreshold(Enum):
    """How an activation threshold is chosen from calibration statistics."""

    MSE = "mse"
    MINMAX = "minmax"


class WeightError(Enum):
    """What a weight threshold minimises.

    MSE: the weight's own squared error. OUTPUT: the layer output's squared error, each weight's error
    weighted by the variance (or, without bias correction, the second moment) of the input channel it
    multiplies: the diagonal of E[x x^T], as GPTQ's layer Hessian is, measured on the calibration images.
    """

    MSE = "mse"
    OUTPUT = "output"


def scale_for(threshold: Tensor, spec: QSpec) -> Tensor:
    return threshold / spec.levels_per_threshold


def fake_quant(x: Tensor, scale: Tensor, spec: QSpec) -> Tensor:
    """Round-to-nearest fake quantization (per channel along dim 0, or per tensor), zero point 0.

    Plain tensor ops rather than torch's fused fake-quantize kernels: torch.export and torch.compile trace
    them (the fused per-tensor op has no meta kernel) and Inductor fuses them. Gradients: straight-through
    for the rounding, zero outside the clipping range.
    """
    s = scale.reshape(-1, *([1] * (x.dim() - 1))) if spec.per_channel else scale
    xs = x / s
    xs = xs + (torch.round(xs) - xs).detach()
    return torch.clamp(xs, spec.qmin, spec.qmax) * s


def fake_quant_values(x: Tensor, scale: Tensor, spec: QSpec) -> Tensor:
    """fake_quant's values without its gradient, per tensor: three kernels and one new tensor where fake_quant
    takes six and five, for the forwards that train nothing. The same values bit for bit: the straight-through
    sum xs + (round(xs) - xs) is round(xs) exactly (the difference is exact, Sterbenz)."""
    return torch.round(x / scale).clamp_(spec.qmin, spec.qmax).mul_(scale)


class _StraightThrough(torch.autograd.Function):
    """fake_quant per tensor at a fixed step, its values bit for bit, in five kernels forward and one backward
    (a bool mask held): torch's fused kernel's gradient, straight through where round(x/s) lies on the grid,
    the grid's bounds included (fake_quant's clamp zeroes those too), zero where clipped. torch's fused CPU
    kernel computes the same, slower, and rounds x * (1/s)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
        codes = torch.div(x, scale).round_()
        clipped = codes.clamp(qmin, qmax)
        ctx.save_for_backward(clipped == codes)
        return clipped.mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None


def fake_quant_trained_input(x: Tensor, scale: Tensor, spec: QSpec) -> Tensor:
    """fake_quant per tensor, for training what feeds it (not the step: `scale` gets no gradient): its values in
    fewer kernels, with the fused kernel's gradient. An autograd Function, which torch.export does not take: for
    training only."""
    if scale.requires_grad:
        raise ConfigError("fake_quant_trained_input: the step gets no gradient here; use fake_quant_learned_step")
    return _StraightThrough.apply(x, scale, spec.qmin, spec.qmax)


def fake_quant_learned_step(x: Tensor, scale: Tensor, spec: QSpec) -> Tensor:
    """fake_quant per tensor with LSQ's gradient for a trainable `scale`: round(x/s) - x/s where round(x/s) lies
    on the grid, the grid's bound where it does not (x's gradient there: 0). torch's fused learnable kernel
    computes the same; fake_quant's clamp would treat codes equal to a bound as clipped."""
    xs = x / scale
    codes = torch.round(xs).detach()
    inside = (codes >= spec.qmin) & (codes <= spec.qmax)
    return torch.where(inside, xs + (codes - xs).detach(), codes.clamp(spec.qmin, spec.qmax)) * scale


def drop_quantization(x: Tensor, q: Tensor, share: float, gen: torch.Generator) -> Tensor:
    """QDrop's mix (Wei et al., ICLR 2022): each element of `x` left float with chance `share`, its quantized value
    `q` otherwise, drawn from `gen`. Weights trained through it fit every graph between the float activations and
    the quantized ones, not one point of that range, which is what lets them hold when activations are narrow."""
    keep_float = torch.empty_like(x).uniform_(generator=gen) < share
    return torch.where(keep_float, x, q)


def quantize_int(x: Tensor, scale: Tensor, spec: QSpec) -> Tensor:
    """Integer codes clamp(round(x / s)) in the spec's range (per channel along dim 0)."""
    s = scale.reshape(-1, *([1] * (x.dim() - 1))) if spec.per_channel else scale
    return torch.clamp(torch.round(x / s), spec.qmin, spec.qmax)


def _pot(t: Tensor) -> Tensor:
    return torch.exp2(torch.ceil(torch.log2(t.clamp_min(_TINY))))


def _no_clip_threshold(lo: Tensor, hi: Tensor, spec: QSpec) -> Tensor:
    """Smallest threshold whose grid covers [lo, hi] without clipping."""
    n = spec.levels_per_threshold
    top = hi * n / spec.qmax
    return torch.maximum(top, -lo) if spec.signed else top


def _candidates(t_max: Tensor, spec: QSpec, n: int) -> Tensor:
    """Threshold candidates (n, *t_max.shape): fractions of the no-clipping threshold, or powers of two."""
    if spec.pot:
        top = _pot(t_max)
        return torch.stack([top / 2**k for k in range(6)])
    # low bit-widths clip much harder at their optimum (2 bits: around 0.3-0.5 of the max)
    lo = 0.15 if spec.grid_bits <= 3 else 0.3
    fracs = torch.linspace(lo, 1.0, n, device=t_max.device, dtype=t_max.dtype)
    return fracs.view(-1, *([1] * t_max.dim())) * t_max


@torch.no_grad()
def weight_thresholds(w: Tensor, spec: QSpec, n_grid: int = 64, importance: Tensor | None = None) -> Tensor:
    """Per-output-channel thresholds minimising the weight's squared quantization error (MSE search), each
    element's error times `importance` (w's shape, e.g. from `input_importance`) when given.

    Channels are searched in parallel; each candidate costs one pass over the weight.
    """
    imp = None if importance is None else importance.float().reshape(w.shape[0], -1)
    if imp is not None:  # a row with no importance at all (inputs constant or dead) falls back to plain MSE
        imp = imp + imp.mean(1, keepdim=True).clamp_min(1e-30) * 1e-6
    if not spec.per_channel:
        return _search(w.reshape(1, -1).float(), spec, n_grid, None if imp is None else imp.reshape(1, -1))[0]
    t = _search(w.reshape(w.shape[0], -1).float(), spec, n_grid, imp)
    # dead channels (all weights ~0) would get ~0 steps; integer backends then overflow their int32 bias
    # (bias / (s_x * s_w)). Any step quantizes such a channel to 0, so floor it relative to the layer's largest.
    return t.clamp_min(float(t.max()) * 2**-16)


def input_importance(weight_shape: torch.Size, groups: int, channel_energy: Tensor) -> Tensor:
    """Per-element importance for a conv/linear weight [C_out, C_in/groups, *kernel] from a per-input-channel
    energy [C_in]: element (o, j, ...) multiplies input channel (o's group) * C_in/groups + j."""
    c_out, c_in_g = weight_shape[0], weight_shape[1]
    group = torch.arange(c_out, device=channel_energy.device) // (c_out // groups)
    idx = group[:, None] * c_in_g + torch.arange(c_in_g, device=channel_energy.device)[None, :]
    e = channel_energy.float().clamp_min(0)[idx]  # [C_out, C_in/groups]
    return e.reshape(*e.shape, *([1] * (len(weight_shape) - 2))).expand(weight_shape)


def _search(rows: Tensor, spec: QSpec, n_grid: int, weights: Tensor | None = None) -> Tensor:
    t_max = _no_clip_threshold(rows.amin(1), rows.amax(1), spec).clamp_min(_TINY)
    # in units of each row's range (a power of two with PoT thresholds, so the candidates stay powers of two):
    # squared errors of a tensor of 1e-20 would underflow float32, and every candidate would tie
    unit = _pot(t_max) if spec.pot else t_max
    return unit * _search_unit(rows / unit.unsqueeze(1), t_max / unit, spec, n_grid, weights)


_SEARCH_CHUNK = 1 << 18  # elements of a block of rows searched at a time: it stays in cache across candidates


def _search_unit(rows: Tensor, t_max: Tensor, spec: QSpec, n_grid: int, weights: Tensor | None) -> Tensor:
    cands = _candidates(t_max, spec, n_grid)
    best = t_max.clone()
    step = max(64, _SEARCH_CHUNK // max(rows.shape[1], 1))  # whole rows, enough of them to split across threads
    for r in range(0, rows.shape[0], step):
        block = slice(r, r + step)
        part = None if weights is None else weights[block]
        best[block] = _search_rows(rows[block], cands[:, block], t_max[block], spec, part)
    return best


def _search_rows(rows: Tensor, cands: Tensor, t_max: Tensor, spec: QSpec, weights: Tensor | None) -> Tensor:
    """The candidate with the least (weighted) squared error per row (t_max where none is finite), computed in one
    reused buffer."""
    best_err = torch.full_like(t_max, math.inf)
    best = t_max.clone()
    err_of = torch.empty_like(rows)
    for t in cands:
        s = (t / spec.levels_per_threshold).unsqueeze(1)
        torch.div(rows, s, out=err_of).round_().clamp_(spec.qmin, spec.qmax).mul_(s).sub_(rows).square_()
        err = (err_of.mul_(weights) if weights is not None else err_of).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, t, best)
    return best


@torch.no_grad()
def activation_threshold(
    lo: float, hi: float, samples: Tensor, spec: QSpec, method: ActThreshold, bins: int = 2048
) -> float:
    """Per-tensor threshold from calibration statistics.

    method "minmax": the smallest threshold that clips nothing of the observed range.
    method "mse": minimise the squared error over a histogram of sampled values; the histogram spans the
    exact observed range, so rare outliers keep their true position even when the sample misses them.
    """
    lo_t, hi_t = torch.tensor([lo]), torch.tensor([hi])
    if method is ActThreshold.MINMAX or samples.numel() == 0:
        t = _no_clip_threshold(lo_t, hi_t, spec).clamp_min(_TINY)
        return float(_pot(t) if spec.pot else t)
    left = lo if spec.signed else 0.0
    right = hi if hi > left else left + max(abs(left), _TINY)  # a constant tensor: any width holds it
    hist = torch.histc(samples.float().clamp(left, right), bins=bins, min=left, max=right)
    edges = torch.linspace(left, right, bins + 1, dtype=torch.float64).float()
    centres = ((edges[1:] + edges[:-1]) / 2).unsqueeze(0)
    return float(_search(centres, spec, 100, weights=hist.unsqueeze(0))[0])
