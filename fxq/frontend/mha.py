"""nn.MultiheadAttention in a form symbolic tracing follows, so that its projections get quantized."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["TraceableMHA"]


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
