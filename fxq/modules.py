"""Modules the passes put into the graph: activation observers, activation and weight fake-quantizers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fxq.meta import OpKind
from fxq.qmath import QSpec, fake_quant, scale_for

__all__ = ["ActObserver", "ChannelMeanObserver", "ActQuant", "QuantWeight", "TraceableMHA"]


class ActObserver(nn.Module):
    """Records the exact min/max of a tensor and a random sample of its values, passes it on unchanged.

    The sample (samples_per_batch values per call) feeds the MSE threshold search; a random sample is
    unbiased where a strided one would alias with the channel or spatial layout.
    """

    fxq_kind = OpKind.OBSERVER

    def __init__(self, samples_per_batch: int = 4096, seed: int = 0):
        super().__init__()
        self.samples_per_batch = samples_per_batch
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))
        self.samples: list[Tensor] = []
        self.batches = 0
        self._gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        self.batches += 1
        lo, hi = torch.aminmax(x.detach())
        # stays on x's device: no host sync per observer per batch
        self.lo = torch.minimum(self.lo.to(lo.device), lo.float())
        self.hi = torch.maximum(self.hi.to(hi.device), hi.float())
        flat = x.detach().reshape(-1)
        idx = torch.randint(flat.numel(), (min(self.samples_per_batch, flat.numel()),), generator=self._gen)
        self.samples.append(flat[idx.to(flat.device)].float())
        return x

    @property
    def observed(self) -> bool:
        return self.batches > 0

    def sample(self) -> Tensor:
        return torch.cat(self.samples).cpu() if self.samples else torch.empty(0)


class ChannelMeanObserver(nn.Module):
    """Running per-channel mean of a layer's input (channel dim 1 for conv, last for linear): bias correction
    needs E[x] to cancel the mean output shift that weight rounding causes."""

    fxq_kind = OpKind.OBSERVER

    def __init__(self, channel_dim: int):
        super().__init__()
        self.channel_dim = channel_dim
        self.register_buffer("total", torch.zeros(0))
        self.count = 0

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        dim = self.channel_dim % x.dim()
        dims = [d for d in range(x.dim()) if d != dim]
        s = x.detach().float().sum(dims)
        self.total = s if self.total.numel() == 0 else self.total.to(s.device) + s
        self.count += x.numel() // x.shape[dim]
        return x

    def mean(self) -> Tensor:
        return self.total / max(self.count, 1)


class ActQuant(nn.Module):
    """Per-tensor symmetric fake quantization of an activation."""

    fxq_kind = OpKind.ACT_QUANT

    def __init__(self, spec: QSpec, threshold: float):
        super().__init__()
        self.spec = spec
        self.register_buffer("scale", scale_for(torch.tensor(float(threshold)), spec))

    def forward(self, x: Tensor) -> Tensor:
        return fake_quant(x, self.scale, self.spec)

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, signed={self.spec.signed}, scale={float(self.scale):.4g}"


class QuantWeight(nn.Module):
    """A conv or linear layer whose weight is fake-quantized per output channel on every call.

    Holds the float layer unchanged so later passes (rounding, mixed precision) can re-derive the grid.
    """

    def __init__(self, layer: nn.Module, spec: QSpec, threshold: Tensor):
        super().__init__()
        self.layer = layer
        self.spec = spec
        self.register_buffer("scale", scale_for(threshold.detach().float(), spec))

    @property
    def fxq_kind(self) -> OpKind:
        return OpKind.LINEAR if isinstance(self.layer, nn.Linear) else OpKind.CONV

    def quantized_weight(self) -> Tensor:
        w = self.layer.weight
        return fake_quant(w, self.scale.to(w.dtype), self.spec).to(w.dtype)

    def forward(self, x: Tensor) -> Tensor:
        w = self.quantized_weight()
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, self.layer.bias)
        return self.layer._conv_forward(x, w, self.layer.bias)

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, per_channel={self.spec.per_channel}"


class TraceableMHA(nn.Module):
    """nn.MultiheadAttention rewritten with nn.Linear projections and explicit matmuls, same numbers.

    symbolic_trace keeps nn.MultiheadAttention as one opaque leaf, so its projections would stay float;
    this form exposes them as linear layers that get quantized like any other (the first and last included).
    """

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        e, self.num_heads, self.batch_first = mha.embed_dim, mha.num_heads, mha.batch_first
        self.head_dim = e // mha.num_heads
        if mha._qkv_same_embed_dim:
            w = mha.in_proj_weight.detach().chunk(3)
        else:
            w = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        b = mha.in_proj_bias.detach().chunk(3) if mha.in_proj_bias is not None else (None, None, None)
        self.q_proj, self.k_proj, self.v_proj = (self._linear(wi, bi) for wi, bi in zip(w, b))
        self.out_proj = self._linear(
            mha.out_proj.weight.detach(), None if mha.out_proj.bias is None else mha.out_proj.bias.detach()
        )

    @staticmethod
    def _linear(w: Tensor, b: Tensor | None) -> nn.Linear:
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        lin.weight.data.copy_(w)
        if b is not None:
            lin.bias.data.copy_(b)
        return lin

    def _heads(self, x: Tensor) -> Tensor:  # (N, L, E) -> (N, H, L, D)
        return x.reshape(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.head_dim**-0.5
        if attn_mask is not None:
            scores = (
                scores.masked_fill(attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
            )
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        attn = scores.softmax(-1)
        out = torch.matmul(attn, v).transpose(1, 2)
        out = self.out_proj(out.reshape(out.shape[0], out.shape[1], -1))
        if not self.batch_first:
            out = out.transpose(0, 1)
        weights = (attn.mean(1) if average_attn_weights else attn) if need_weights else None
        return out, weights
