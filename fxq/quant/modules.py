"""Modules the passes put into the graph: activation observers, activation and weight fake-quantizers."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fxq.dist.world import World
from fxq.errors import ConfigError
from fxq.ir.meta import OpKind
from fxq.quant.qmath import (
    QSpec,
    drop_quantization,
    fake_quant,
    fake_quant_learned_step,
    fake_quant_trained_input,
    fake_quant_values,
    scale_for,
)

__all__ = [
    "ActObserver",
    "ChannelStatsObserver",
    "ActQuant",
    "QuantWeight",
    "layer_forward",
    "mean_output_shift",
    "input_mean_map",
]


class ActObserver(nn.Module):
    """Records the exact min/max of a tensor and a random sample of its values, passes it on unchanged.

    The sample (samples_per_batch values per call) feeds the MSE threshold search; a random sample is
    unbiased where a strided one would alias with the channel or spatial layout. Which values batch i gives
    depends on (seed, i) alone, and the samples are kept by batch index, so ranks that each saw some of the
    batches merge into exactly the observer one process would have (`merge_`).
    """

    fxq_kind = OpKind.OBSERVER

    def __init__(self, samples_per_batch: int = 4096, seed: int = 0):
        super().__init__()
        self.samples_per_batch = samples_per_batch
        self.seed = seed
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))
        self.samples: dict[int, Tensor] = {}  # batch index -> that batch's sample
        self.batches = 0
        self.next_index = 0  # the index of the next batch (Calibrate sets it to the batch's place in the run)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        self.batches += 1
        lo, hi = torch.aminmax(x.detach())
        # stays on x's device: no host sync per observer per batch
        self.lo = torch.minimum(self.lo.to(lo.device), lo.float())
        self.hi = torch.maximum(self.hi.to(hi.device), hi.float())
        flat = x.detach().reshape(-1)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.next_index)
        idx = torch.randint(flat.numel(), (min(self.samples_per_batch, flat.numel()),), generator=gen)
        self.samples[self.next_index] = flat[idx.to(flat.device)].float()
        self.next_index += 1
        return x

    @property
    def observed(self) -> bool:
        return self.batches > 0

    def sample(self) -> Tensor:
        """Every batch's sample, in batch order."""
        return torch.cat([self.samples[i] for i in sorted(self.samples)]).cpu() if self.samples else torch.empty(0)

    @torch.no_grad()
    def merge_(self, world: World) -> None:
        """Make this the observer of every rank's batches: exact min/max, every batch's sample in batch order."""
        if world.solo:
            return
        self.lo, self.hi = world.min_(self.lo.cpu(), "calibration"), world.max_(self.hi.cpu(), "calibration")
        keys = sorted(self.samples)
        index = torch.tensor([[k, len(self.samples[k])] for k in keys], dtype=torch.int64).reshape(-1, 2)
        data = torch.cat([self.samples[k].cpu() for k in keys]) if keys else torch.empty(0)
        merged: dict[int, Tensor] = {}
        for idx, values in zip(world.gather(index, "calibration"), world.gather(data, "calibration")):
            merged.update(zip(idx[:, 0].tolist(), values.split(idx[:, 1].tolist())))
        self.samples = merged
        self.batches = int(world.sum_(torch.tensor([self.batches]), "calibration"))
        self.next_index = max(merged, default=-1) + 1


class ChannelStatsObserver(nn.Module):
    """Running per-channel mean and second moment of a layer's input (channel dim 1 for conv, last for
    linear): bias correction needs E[x] to cancel the mean output shift that weight rounding causes, and the
    output-error weight threshold (WeightError.OUTPUT) weighs each input channel by its spread. The sums are
    float64, so adding the ranks' sums in another order than one process adds its batches changes nothing
    that float32 holds."""

    fxq_kind = OpKind.OBSERVER

    def __init__(self, channel_dim: int):
        super().__init__()
        self.channel_dim = channel_dim
        self.register_buffer("total", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("total_sq", torch.zeros(0, dtype=torch.float64))
        self.count = 0

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        dim = self.channel_dim % x.dim()
        dims = [d for d in range(x.dim()) if d != dim]
        xf = x.detach().float()
        s, s2 = xf.sum(dims).double(), xf.square().sum(dims).double()
        first = self.total.numel() == 0
        self.total = s if first else self.total.to(s.device) + s
        self.total_sq = s2 if first else self.total_sq.to(s.device) + s2
        self.count += x.numel() // x.shape[dim]
        return x

    @torch.no_grad()
    def merge_(self, world: World) -> None:
        """Sums over every rank's batches (a rank that saw none adds zeros)."""
        if world.solo:
            return
        channels = int(world.max_(torch.tensor([self.total.numel()]), "calibration"))
        for name in ("total", "total_sq"):
            t = getattr(self, name)
            t = t.cpu() if t.numel() else torch.zeros(channels, dtype=torch.float64)
            setattr(self, name, world.sum_(t, "calibration").to(getattr(self, name).device))
        self.count = int(world.sum_(torch.tensor([self.count]), "calibration"))

    @staticmethod
    def pooled(observers: list[ChannelStatsObserver]) -> tuple[Tensor, Tensor]:
        """(mean, second moment) over everything the observers saw together (the inputs of a layer's call sites)."""
        count = max(sum(o.count for o in observers), 1)
        total = sum(o.total.to(observers[0].total.device) for o in observers)
        total_sq = sum(o.total_sq.to(observers[0].total.device) for o in observers)
        return (total / count).float(), (total_sq / count).float()

    def mean(self) -> Tensor:
        return (self.total / max(self.count, 1)).float()

    def second_moment(self) -> Tensor:
        return (self.total_sq / max(self.count, 1)).float()

    def variance(self) -> Tensor:
        return (self.second_moment() - self.mean().square()).clamp_min(0)


class ActQuant(nn.Module):
    """Per-tensor symmetric fake quantization of an activation."""

    fxq_kind = OpKind.ACT_QUANT

    def __init__(self, spec: QSpec, threshold: float):
        super().__init__()
        self.spec = spec
        self.register_buffer("scale", scale_for(torch.tensor(float(threshold)), spec))
        self.training_kernels = False  # set by the rounding optimization while it trains
        self.live_scale: Tensor | None = None  # a step being trained (fxq.eptq.act_steps), shape (1,)
        # while the rounding trains with act_drop: (the share of elements left float, their generator)
        self.drop: tuple[float, torch.Generator] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.drop is not None and torch.is_grad_enabled():  # the steps, not the checks between them
            return drop_quantization(x, self._quantized(x), *self.drop)
        return self._quantized(x)

    def _quantized(self, x: Tensor) -> Tensor:
        if self.live_scale is not None and torch.is_grad_enabled():
            return self._learned(x)
        if self.training_kernels and x.requires_grad:
            # training: fewer kernels than the formula below, which torch.export and torch.compile trace. On a
            # GPU torch's fused fake-quantize, one launch each way (it rounds x * (1/s), so a tie may differ); on
            # a CPU, where that kernel is the slower, a straight-through function with the formula's values
            if x.is_cuda and x.dtype == torch.float32:
                zero = self.scale.new_zeros((), dtype=torch.int32)
                return torch.fake_quantize_per_tensor_affine(x, self.scale, zero, self.spec.qmin, self.spec.qmax)
            return fake_quant_trained_input(x, self.scale, self.spec)
        if not x.requires_grad and not torch.compiler.is_compiling():  # in place: nothing traces or trains it
            return fake_quant_values(x, self.scale, self.spec)
        return fake_quant(x, self.scale, self.spec)

    def _learned(self, x: Tensor) -> Tensor:
        """Fake quantization at the live step, with LSQ's gradient for it: round(x/s) - x/s inside the grid, its
        bound outside (torch's fused kernel, or the same formula through autograd)."""
        if self.training_kernels and x.dtype == torch.float32:
            zero = self.live_scale.new_zeros(1)
            return torch._fake_quantize_learnable_per_tensor_affine(
                x, self.live_scale, zero, self.spec.qmin, self.spec.qmax, 1.0
            )
        return fake_quant_learned_step(x, self.live_scale.to(x.dtype).reshape(()), self.spec)

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, signed={self.spec.signed}, scale={float(self.scale):.4g}"


def layer_forward(layer: nn.Module, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """A conv or linear layer's op on x with weight w and bias b in place of its own."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, w, b)
    return layer._conv_forward(x, w, b)


def mean_output_shift(layer: nn.Module, dw: Tensor, x_mean: Tensor) -> Tensor:
    """E[y'] - E[y] per output channel when `layer`'s weight moves by dw and its input has channel means x_mean
    (padding ignored): what bias correction subtracts."""
    return (dw * input_mean_map(layer, x_mean)).flatten(1).sum(1)


def input_mean_map(layer: nn.Module, x_mean: Tensor) -> Tensor:
    """E[x] of the input each weight multiplies, broadcastable to the weight: (1, Cin) for linear,
    (Cout, Cin/g, 1, ...) for conv (each output channel sees its group's inputs; padding ignored)."""
    if isinstance(layer, nn.Linear):
        return x_mean.reshape(1, -1)
    w = layer.weight
    g = layer.groups
    x = x_mean.view(g, -1).repeat_interleave(w.shape[0] // g, dim=0)  # (Cout, Cin/g)
    return x.reshape(*x.shape, *([1] * (w.dim() - 2)))


class QuantWeight(nn.Module):
    """A conv or linear layer whose weight is fake-quantized per output channel on every call.

    Holds the float layer unchanged so later passes (rounding, mixed precision) can re-derive the grid.
    During the rounding optimization (fxq.eptq.soft_rounding) its forward uses the soft weight and
    bias held in `live`; hardening then writes grid values into the layer's weight, after which plain
    round-to-nearest reproduces them exactly.

    With bias correction it keeps the layer's input channel means and float bias: the corrected bias is always
    float bias - E[x] (W_q - W), for RTN weights, for the soft weights while they train, and for the hard ones.
    """

    def __init__(self, layer: nn.Module, spec: QSpec, threshold: Tensor):
        super().__init__()
        self.layer = layer
        self.spec = spec
        self.register_buffer("scale", scale_for(threshold.detach().float(), spec))
        self.register_buffer("input_mean", None)  # E[x] per input channel, when bias correction is on
        self.register_buffer("float_bias", None)
        # while a soft rounding (fxq.eptq.soft_rounding) runs on this layer: its current choice of codes
        self.soft_codes: Callable[[], Tensor] | None = None
        self.live: tuple[Tensor, Tensor] | None = None  # its soft weight and bias for the next forward

    @property
    def fxq_kind(self) -> OpKind:
        return OpKind.LINEAR if isinstance(self.layer, nn.Linear) else OpKind.CONV

    def scale_like(self, w: Tensor) -> Tensor:
        """The per-channel step, shaped to broadcast against `w`."""
        return self.scale.to(w.dtype).reshape(-1, *([1] * (w.dim() - 1)))

    def bias_shift(self, w_q: Tensor) -> Tensor | None:
        """E[x] (W_q - W): the mean output shift that quantizing the weight to w_q causes (None: no correction)."""
        if self.input_mean is None:
            return None
        dw = (w_q - self.layer.weight.detach()).float()
        return mean_output_shift(self.layer, dw, self.input_mean.to(dw.device)).to(self.layer.weight.dtype)

    def bias_for(self, w_q: Tensor) -> Tensor:
        """The bias that goes with weight w_q: with bias correction float bias - E[x] (W_q - W), else the layer's."""
        shift = self.bias_shift(w_q)
        return self.ensure_bias().detach() if shift is None else self.float_bias - shift

    @torch.no_grad()
    def correct_bias_(self, input_mean: Tensor) -> None:
        """Empirical bias correction (Nagel et al. 2019, MCT's default): b = b_float - E[x] (W_q - W)."""
        self.float_bias = self.ensure_bias().detach().clone()
        self.input_mean = input_mean.detach().float()
        self.layer.bias.copy_(self.bias_for(self.quantized_weight().detach()))

    def uncorrected_bias(self) -> Tensor:
        """A copy of the bias before any bias correction (the float bias; the layer's own without correction)."""
        bias = self.float_bias if self.float_bias is not None else self.ensure_bias()
        return bias.detach().clone().to(self.layer.weight.dtype)

    def ensure_bias(self) -> nn.Parameter:
        """The layer's bias, created as zeros when it has none (bias correction and the rounding need one)."""
        layer = self.layer
        if layer.bias is None:
            w = layer.weight
            layer.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), requires_grad=False)
        return layer.bias

    def hard_codes(self) -> Tensor:
        """Integer codes of the weight: round-to-nearest, or the current choice of a running soft rounding."""
        if self.soft_codes is not None:
            return self.soft_codes()
        w = self.layer.weight.detach()
        return torch.clamp(torch.round(w / self.scale_like(w)), self.spec.qmin, self.spec.qmax)

    @torch.no_grad()
    def rounding_bounds(self) -> tuple[Tensor, Tensor]:
        """The two grid codes a rounding of each weight chooses between: the lower, clamp(floor(w/s)), and 1 where
        the upper, floor(w/s) + 1, is another code on the grid (0 at or beyond its ends: the lower is the only)."""
        w = self.layer.weight.detach()
        floor = torch.floor(w / self.scale_like(w))
        free = (floor >= self.spec.qmin) & (floor < self.spec.qmax)
        return floor.clamp(self.spec.qmin, self.spec.qmax), free.to(w.dtype)

    @torch.no_grad()
    def harden_to_(self, codes: Tensor, bias: Tensor, scale_factor: Tensor | None = None) -> None:
        """The weight becomes codes * step (the step times `scale_factor` when given), the bias `bias` corrected
        for that weight when bias correction is on; the weight is then its own grid: nothing is left to correct."""
        w = self.layer.weight
        if scale_factor is not None:
            self.scale.mul_(scale_factor.to(self.scale))
        hard = (codes * self.scale_like(w)).to(w.dtype)
        shift = self.bias_shift(hard)
        self.ensure_bias().copy_(bias if shift is None else bias - shift)
        w.copy_(hard)
        self.input_mean = self.float_bias = None

    def hardened_state(self) -> dict[str, Tensor]:
        """What a hardened layer holds (its integer codes, steps and bias), for a checkpoint to restore exactly."""
        narrow = self.spec.qmin >= -128 and self.spec.qmax <= 127
        codes = self.hard_codes().to(torch.int8 if narrow else torch.int16)
        return {"codes": codes, "scale": self.scale.detach().clone(), "bias": self.ensure_bias().detach().clone()}

    @torch.no_grad()
    def load_hardened_(self, state: dict[str, Tensor]) -> None:
        """The layer as `hardened_state` found it: weight codes * step, the bias as it was (already corrected)."""
        w = self.layer.weight
        self.scale.copy_(state["scale"])
        w.copy_(state["codes"].to(w.device, w.dtype) * self.scale_like(w))
        self.ensure_bias().copy_(state["bias"])
        self.input_mean = self.float_bias = None
        self.live = None

    def quantized_weight(self) -> Tensor:
        if self.live is not None:
            return self.live[0]
        w = self.layer.weight
        return fake_quant(w, self.scale.to(w.dtype), self.spec).to(w.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.live is not None:
            return layer_forward(self.layer, x, *self.live)
        if self.soft_codes is not None:
            raise ConfigError("QuantWeight: soft rounding is on but has no weights yet; call its refresh() first")
        return layer_forward(self.layer, x, self.quantized_weight(), self.layer.bias)

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, per_channel={self.spec.per_channel}"
