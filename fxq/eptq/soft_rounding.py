"""AdaRound's soft rounding for a whole network at once, its state in flat tensors.

Kept per layer, each step of the rounding optimization spends some twenty small kernels on every quantized
layer (h(V), the soft weight, its live bias correction, their gradients, the optimizers) beside one
convolution. On a GPU at batch 32 those launches, not the arithmetic, can set the step time. Here the V,
the trainable biases and step factors of all layers are one flat tensor each, laid out in the weights'
memory order: h(V), every soft weight and every bias correction take a handful of kernels for the whole
network, each layer reads views of the results, and each optimizer updates one tensor.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fxq.errors import ConfigError
from fxq.quant.modules import QuantWeight, input_mean_map

__all__ = ["SoftRounding", "memory_order", "rectified_sigmoid", "inverse_rectified_sigmoid", "rounding_penalty"]

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid, so h(V) reaches exactly 0 and 1
_PAST_CLIP = 6.0  # |V| where h(V) is clipped to 0 or 1 with a margin (the clip starts at |V| = log 11 = 2.4)


def rectified_sigmoid(v: Tensor) -> Tensor:
    """AdaRound's h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)."""
    # hardtanh is clamp(., 0, 1) with a one-kernel backward (clamp's takes five)
    return F.hardtanh(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(h: Tensor) -> Tensor:
    """V with h(V) = h for h in (0, 1): the initialisation that makes the soft weight equal the float one."""
    p = ((h - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


class _RoundingPenalty(torch.autograd.Function):
    """sum(1 - |2h - 1|^beta) and its gradient -2 beta |2h - 1|^(beta - 1) sign(2h - 1), holding only h for the
    backward (the step keeps it anyway): the plain formula's autograd holds four more tensors the size of h."""

    @staticmethod
    def forward(ctx, h: Tensor, beta: float) -> Tensor:
        ctx.save_for_backward(h)
        ctx.beta = beta
        return _power_((2 * h - 1).abs_(), beta).neg_().add_(1).sum()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (h,) = ctx.saved_tensors
        d = 2 * h - 1
        return d.sign().mul_(_power_(d.abs_(), ctx.beta - 1)).mul_(-2 * ctx.beta * grad), None


def _power_(t: Tensor, p: float) -> Tensor:
    """t^p in place for t >= 0: exp(p log t), two vectorised kernels, where pow with a float exponent is the
    slower on a CPU (0 stays 0 for p > 0; pow for the rest)."""
    return t.log_().mul_(p).exp_() if p > 0 else t.pow_(p)


def rounding_penalty(h: Tensor, beta: float) -> Tensor:
    """AdaRound's regulariser sum(1 - |2h - 1|^beta): zero only when each h is exactly 0 or 1."""
    return _RoundingPenalty.apply(h, beta)


def memory_order(t: Tensor) -> tuple[int, ...]:
    """t's dimensions from outermost to innermost in memory (ties, from size-1 dimensions, in logical order)."""
    return tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), d)))


class SoftRounding:
    """Soft weights s * clamp(floor(w/s) + h(V), qmin, qmax) for every layer in `layers`, trainable through V.

    V starts where the soft weight equals the float weight. The trainable biases start at the float biases
    (before any bias correction): a corrected layer's forward subtracts the correction E[x] (W_q - W) of its
    current soft weight. With `train_scale` each output channel's step gets a trainable factor (1 at first).

    `refresh()` computes all soft weights and biases for the next forward (the layers read them), `harden_()`
    writes the chosen grid values into the layers, `close()` ends it either way.
    """

    def __init__(self, layers: Sequence[QuantWeight], train_scale: bool = False):
        if not layers:
            raise ConfigError("soft rounding: no quantized layers given")
        if busy := [i for i, qw in enumerate(layers) if qw.soft_codes is not None]:
            raise ConfigError(f"soft rounding: layers {busy[:3]} are already soft-rounding; harden or close them")
        self.layers = list(layers)
        self._orders = [memory_order(qw.layer.weight) for qw in layers]
        self.sizes = [qw.layer.weight.numel() for qw in layers]
        self.channels = [qw.layer.weight.shape[0] for qw in layers]
        # one flat tensor per kind, filled layer by layer: what a step needs per weight is all it holds (the
        # largest models' state is several times their weights)
        corrected = any(qw.input_mean is not None for qw in layers)
        w0 = layers[0].layer.weight
        state = [w0.new_empty(sum(self.sizes)) for _ in range(5 if corrected else 3)]
        self.channel_step = w0.new_empty(sum(self.channels))
        for qw, order, step, *flat in zip(
            layers, self._orders, self.channel_step.split(self.channels), *(t.split(self.sizes) for t in state)
        ):
            for dst, src in zip(flat, _layer_state(qw, order, corrected)):
                dst.copy_(src)
            step.copy_(qw.scale.detach().to(step.dtype).expand(len(step)))
        v, self.floor, self.free = state[:3]
        self.weight, self.mean_map = state[3:] if corrected else (None, None)
        # weights per output channel, as segment lengths: each channel's weights are contiguous in the flat form
        self.per_channel = torch.tensor(
            [n // c for n, c in zip(self.sizes, self.channels) for _ in range(c)], device=v.device
        )
        self.v = v.requires_grad_()
        self.bias = torch.cat([qw.uncorrected_bias() for qw in layers]).requires_grad_()
        self.scale_factor = torch.ones(sum(self.channels), device=v.device, requires_grad=True) if train_scale else None
        self._h: Tensor | None = None
        self._h_version = -1
        self._fixed_steps: Tensor | None = None
        for i, qw in enumerate(layers):
            qw.soft_codes = functools.partial(self._codes_of, i)

    @torch.no_grad()
    def start_from_(self, choices: Sequence[Tensor | None], confidence: float) -> None:
        """Start each layer given a choice (1: floor(w/s) + 1, 0: floor(w/s), per weight) at that choice: h(V)
        on the chosen side at `confidence` (0.5: undecided). Below 1 the gradient still reaches V; at 1 each h
        sits at 0 or 1, where the clip passes no gradient, so the choice is kept and only the biases and step
        factors train (where every layer is given a choice, V then takes no gradient at all)."""
        if not 0.5 < confidence <= 1:
            raise ConfigError(f"soft rounding: a start's confidence must lie in (0.5, 1], not {confidence}")
        for v, choice, order in zip(self.v.split(self.sizes), choices, self._orders):
            if choice is not None:
                chosen = choice.permute(order).reshape(-1).to(v)
                if confidence == 1:  # past the clip on either side: h(V) is exactly the choice
                    v.copy_(chosen * 2 * _PAST_CLIP - _PAST_CLIP)
                else:
                    v.copy_(inverse_rectified_sigmoid(chosen * (2 * confidence - 1) + (1 - confidence)))
        if confidence == 1 and all(choice is not None for choice in choices):
            # every h(V) at 0 or 1 for good: V takes no gradient, so the backward skips the weights' gradients
            self.v.requires_grad_(False)

    def parameters(self) -> list[Tensor]:
        return [self.v, self.bias] + ([self.scale_factor] if self.scale_factor is not None else [])

    def refresh(self) -> None:
        """Every layer's soft weight and bias from the current V, biases and factors, for the next forward."""
        h = rectified_sigmoid(self.v)
        self._h, self._h_version = h, self.v._version  # the regulariser of this step reads it
        w = torch.addcmul(self.floor, self.free, h) * self._steps()
        b = self.bias
        if self.mean_map is not None:  # b - E[x] (W_q - W), summed per output channel
            shift = torch.segment_reduce(
                (w - self.weight) * self.mean_map, "sum", lengths=self.per_channel, unsafe=True
            )
            b = b - shift
        for qw, wl, bl, order in zip(self.layers, w.split(self.sizes), b.split(self.channels), self._orders):
            qw.live = (_unflatten(wl, qw.layer.weight.shape, order), bl)

    def regularizer(self, beta: float) -> Tensor:
        """sum over every weight of 1 - |2h(V) - 1|^beta: zero only when each h is exactly 0 or 1. Reuses the
        h(V) of this step's `refresh` (same V) instead of computing it again."""
        if not self.v.requires_grad:  # every choice kept (start_from_ at confidence 1): each h is 0 or 1
            return self.v.new_zeros(())
        fresh = self._h is not None and self._h.requires_grad and self._h_version == self.v._version
        h = self._h if fresh else rectified_sigmoid(self.v)
        return rounding_penalty(h, beta)

    @torch.no_grad()
    def hard_codes(self) -> list[Tensor]:
        """Each layer's integer codes now: floor(w/s) + 1[h(V) >= 0.5] (h >= 0.5 exactly when V >= 0), clipped."""
        codes = torch.addcmul(self.floor, self.free, self.sides().to(self.free.dtype))
        return [
            _unflatten(c, qw.layer.weight.shape, order)
            for qw, c, order in zip(self.layers, codes.split(self.sizes), self._orders)
        ]

    @torch.no_grad()
    def sides(self) -> Tensor:
        """Each weight's rounding now, flat: True where it rounds up (h(V) >= 0.5 exactly when V >= 0)."""
        return self.v >= 0

    @torch.no_grad()
    def changed_since(self, sides: Tensor) -> tuple[int, int]:
        """How many weights round otherwise than in `sides` (an earlier `sides()`), and how many the grid leaves
        a choice (the others clamp to its end either way)."""
        free = self.free > 0
        return int((self.sides() != sides)[free].sum()), int(free.sum())

    @torch.no_grad()
    def _codes_of(self, i: int) -> Tensor:
        return self.hard_codes()[i]

    def harden_(self) -> None:
        """End soft rounding: each layer's weight becomes its grid codes times its (trained) step, its bias the
        trained one (corrected for the hard weight), and the state is dropped."""
        factors = self.scale_factor.split(self.channels) if self.scale_factor is not None else [None] * len(self.layers)
        for qw, codes, bias, factor in zip(self.layers, self.hard_codes(), self.bias.split(self.channels), factors):
            qw.harden_to_(codes, bias, factor)
        self.close()

    def close(self) -> None:
        """Detach from the layers (harden_ first to keep the result); their weights and biases are untouched."""
        for qw in self.layers:
            qw.soft_codes = qw.live = None
        self._h = self._fixed_steps = None

    def state_dict(self) -> dict[str, Tensor]:
        """The trained tensors, on the CPU (checkpoints)."""
        return {k: v.detach().cpu() for k, v in zip(("v", "bias", "scale_factor"), self.parameters())}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for name, t in zip(("v", "bias", "scale_factor"), self.parameters()):
            if state[name].shape != t.shape:
                raise ConfigError(
                    f"soft rounding: saved {name} has shape {tuple(state[name].shape)}, not {tuple(t.shape)}"
                )
            t.copy_(state[name])

    def _steps(self) -> Tensor:
        """Every weight's step: its channel's, times the channel's trained factor. Without factors the steps are
        fixed: expanded once and kept."""
        if self.scale_factor is None:
            if self._fixed_steps is None:
                self._fixed_steps = self._expanded(self.channel_step)
            return self._fixed_steps
        return self._expanded(self.channel_step * self.scale_factor)

    def _expanded(self, per_channel: Tensor) -> Tensor:
        return per_channel.repeat_interleave(self.per_channel, output_size=len(self.floor))  # no host sync


def _layer_state(qw: QuantWeight, order: tuple[int, ...], corrected: bool) -> tuple[Tensor, ...]:
    """V at the start, clamped floor and free mask of one layer, and with `corrected` (some layer has a bias
    correction) its float weight and E[x] map, each flat in memory order."""
    w = qw.layer.weight.detach()
    ws = w / qw.scale_like(w)
    # clamp(floor + h, qmin, qmax) = clamp(floor) + free * h for h in [0, 1]: no clamp per step
    lower, free = qw.rounding_bounds()
    state = [inverse_rectified_sigmoid(ws - torch.floor(ws)), lower, free]
    if corrected:
        has_mean = qw.input_mean is not None
        mean_map = input_mean_map(qw.layer, qw.input_mean.to(w.device)).to(w.dtype) if has_mean else w.new_zeros(())
        state += [w, mean_map.expand_as(w)]
    return tuple(t.permute(order).reshape(-1) for t in state)


def _unflatten(flat: Tensor, shape: torch.Size, order: tuple[int, ...]) -> Tensor:
    """The inverse of t.permute(order).reshape(-1): a view with t's shape and strides."""
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return flat.view([shape[d] for d in order]).permute(inverse)
