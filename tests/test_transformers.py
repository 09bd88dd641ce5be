"""Transformers: both attention matmuls and every projection quantized under both front-ends (fused attention
written out), the residual stream that only layer norms read left float, so a small class token survives."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxq
from fxq.config import PTQConfig
from fxq.frontend.trace import trace
from fxq.ir.meta import OpKind
from fxq.ir.ops import grid_source, kind_of
from fxq.passes.normalize import Normalize
from fxq.pipeline import run_passes
from fxq.quant.modules import ActQuant, QuantWeight
from fxq.targets import INT8
from tests.conftest import seeded, sqnr_db

SIZE = 32
CALIB = [seeded(8, 3, SIZE, SIZE, seed=i) for i in range(4)]
X = CALIB[0]  # images the thresholds saw: these tests are about what a grid holds, not about 32 images' coverage


def _vit() -> nn.Module:
    """A two-block ViT with a class token 50 times smaller than the patch tokens (a trained ViT's is small too)."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=SIZE, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )
    with torch.no_grad():
        model.class_token.normal_(0, 0.02)
        model.heads.head.weight.normal_(0, 0.2)
    return model.eval()


class FusedAttention(nn.Module):
    """timm's attention block: one qkv projection, F.scaled_dot_product_attention, an output projection."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class UnboundAttention(nn.Module):
    """timm's attention written out (Swin's, or any block with fused attention off): q, k and v unbound from one
    projection, a softmax behind dropout."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj, self.drop = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Dropout(0.1)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = self.drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(-1))
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


def _on_grid(gm, node) -> bool:
    return grid_source(gm, node, ActQuant) is not None


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_every_integer_op_reads_a_grid_and_the_residual_stream_stays_float(frontend):
    qgm, _ = fxq.quantize(_vit(), CALIB, PTQConfig(frontend=frontend, progress=False))
    layers = [
        n for n in qgm.graph.nodes if n.op == "call_module" and isinstance(qgm.get_submodule(n.target), QuantWeight)
    ]
    matmuls = [n for n in qgm.graph.nodes if kind_of(qgm, n) is OpKind.MATMUL]
    # conv_proj, 2 x (q, k, v or one in_proj, out_proj, mlp 0 and 3), the head
    assert len(layers) == 2 + 2 * (4 if frontend == "export" else 6)
    assert len(matmuls) == 2 * 2  # both attention matmuls of each block, under export written out of SDPA
    assert all(_on_grid(qgm, n.args[0]) for n in layers)
    assert all(_on_grid(qgm, a) for n in matmuls for a in n.args[:2])
    adds = [n for n in qgm.graph.nodes if kind_of(qgm, n) in (OpKind.ADD, OpKind.CAT)]
    assert len(adds) >= 1 + 1 + 2 * 2  # class token cat, position embedding, two residual adds per block
    quantized = [
        n
        for n in adds
        if any(isinstance(qgm.get_submodule(u.target), ActQuant) for u in n.users if u.op == "call_module")
    ]
    assert not quantized, [n.name for n in quantized]


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_the_class_token_survives_w8a8(frontend):
    model = _vit()
    with torch.no_grad():
        ref = model(X)
    scores = {}
    for norm_inputs in (False, True):
        target = replace(INT8, quantize_norm_inputs=norm_inputs)
        qgm, _ = fxq.quantize(model, CALIB, PTQConfig(target=target, frontend=frontend, progress=False))
        with torch.no_grad():
            scores[norm_inputs] = sqnr_db(ref, qgm(X))
    assert scores[False] > 25.0, scores
    # one grid over the residual stream: the class token, all the head reads, is mostly rounding noise
    assert scores[True] < scores[False] - 10.0, scores


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_fused_attention_is_written_out_with_the_same_numbers(with_mask, frontend):
    torch.manual_seed(1)
    model = FusedAttention().eval()
    x = seeded(2, 5, 16, seed=3)
    mask = seeded(5, 5, seed=4) > 0 if with_mask else None
    mask = None if mask is None else mask | torch.eye(5, dtype=torch.bool)  # every row keeps a key
    gm = run_passes(trace(model, (x, mask), frontend), [Normalize()])
    targets = [n.target for n in gm.graph.nodes]
    assert not {F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default} & set(targets)
    assert targets.count(torch.matmul) == 2
    with torch.no_grad():
        torch.testing.assert_close(gm(x, mask), model(x, mask), rtol=1e-5, atol=1e-6)


def test_a_value_that_a_linear_layer_also_reads_keeps_its_grid():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)

        def forward(self, x):
            y = x + self.a(x)  # read by the norm and by c
            z = y + self.b(self.norm(y))  # read by the norm only
            return self.c(y) + self.norm(z)

    model = Block().eval()
    calib = [seeded(4, 6, 8, seed=i) for i in range(2)]
    qgm, _ = fxq.quantize(model, calib, PTQConfig(progress=False))
    c = next(n for n in qgm.graph.nodes if n.target == "c")
    norm_y, norm_z = [n for n in qgm.graph.nodes if n.target == "norm"]
    assert _on_grid(qgm, c.args[0]) and _on_grid(qgm, norm_y.args[0])  # y: a linear layer reads it too
    assert not _on_grid(qgm, norm_z.args[0])  # z: only the norm reads it


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_attention_through_unbind_and_dropout_reads_grids(frontend):
    # q, k, v reach the matmuls through unbind and getitem, the probabilities through dropout: values on the
    # projection's and the softmax's grids, which the integer lowering must see
    torch.manual_seed(2)
    calib = [seeded(4, 5, 16, seed=i) for i in range(2)]
    qgm, _ = fxq.quantize(UnboundAttention().eval(), calib, PTQConfig(frontend=frontend, progress=False))
    matmuls = [n for n in qgm.graph.nodes if kind_of(qgm, n) is OpKind.MATMUL]
    assert len(matmuls) == 2
    assert all(_on_grid(qgm, a) for n in matmuls for a in n.args[:2])
