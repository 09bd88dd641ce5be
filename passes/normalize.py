"""Normalize: functional conv/linear/batch-norm on parameters become nn modules; fused attention becomes its
two matmuls and a softmax.

Front-ends disagree on how a layer looks: symbolic_trace keeps nn.Conv2d as call_module but traces
through subclasses with their own forward (EfficientNet-Lite's same-padding conv calls F.conv2d on
get_attr weights); torch.export yields aten.conv2d on get_attr weights. Later passes see one form.
scaled_dot_product_attention (timm's fused attention; nn.MultiheadAttention under export) hides both attention
matmuls in one op that would stay float: written out, they are quantized like any matmul.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from fxq.ir.meta import OpKind
from fxq.ir.ops import fetch_attr, kind_of
from fxq.ir.passbase import FxqPass, PassResult

__all__ = ["Normalize"]

aten = torch.ops.aten
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
# ATen batch-norm variants that return a tuple whose item 0 is the output
_BN_TUPLE = {aten._native_batch_norm_legit_no_training.default}


class AnyRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Eval batch norm for a functional call whose input rank the graph does not record."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        pass


def _param(gm: GraphModule, arg) -> nn.Parameter | torch.Tensor | None:
    if isinstance(arg, Node) and arg.op == "get_attr":
        return fetch_attr(gm, arg.target)
    return None


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_LINEAR_ARGS = ("input", "weight", "bias")
# positional layouts of the batch-norm spellings the front-ends produce
_BN_ARGS = {
    F.batch_norm: ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    aten.batch_norm.default: (
        "input",
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "training",
        "momentum",
        "eps",
        "cudnn_enabled",
    ),
    aten._native_batch_norm_legit_no_training.default: (
        "input",
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "momentum",
        "eps",
    ),
}


def _args(node: Node, names: tuple[str, ...]) -> dict:
    """Positional and keyword arguments by name (torch's schema matcher is ambiguous for conv2d)."""
    return {**dict(zip(names, node.args)), **node.kwargs}


def _with_params(layer: nn.Module, w: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """Give a layer built on the meta device the graph's own tensors (shared, not copied)."""
    as_param = lambda t: t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)  # noqa: E731
    layer.weight = as_param(w)
    if bias is not None:
        layer.bias = as_param(bias)
    return layer


def _conv(gm: GraphModule, node: Node) -> nn.Module | None:
    a = _args(node, _CONV_ARGS)
    w = _param(gm, a.get("weight"))
    b = a.get("bias")
    bias = _param(gm, b)
    if w is None or (b is not None and bias is None):
        return None
    d = w.dim() - 2
    pad = a.get("padding", 0)
    conv = _CONV[d](
        w.shape[1] * a.get("groups", 1),
        w.shape[0],
        tuple(w.shape[2:]),
        stride=a.get("stride", 1),
        padding=pad if isinstance(pad, str) else tuple(pad) if isinstance(pad, (list, tuple)) else pad,
        dilation=a.get("dilation", 1),
        groups=a.get("groups", 1),
        bias=bias is not None,
        device="meta",
    )
    return _with_params(conv, w, bias)


def _linear(gm: GraphModule, node: Node) -> nn.Module | None:
    a = _args(node, _LINEAR_ARGS)
    w, b = _param(gm, a.get("weight")), a.get("bias")
    bias = _param(gm, b)
    if w is None or w.dim() != 2 or (b is not None and bias is None):
        return None
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    return _with_params(lin, w, bias)


def _batchnorm(gm: GraphModule, node: Node) -> nn.Module | None:
    if node.target not in _BN_ARGS:
        return None
    a = _args(node, _BN_ARGS[node.target])
    if a.get("training", False):
        return None
    mean, var = _param(gm, a.get("running_mean")), _param(gm, a.get("running_var"))
    w, b = _param(gm, a.get("weight")), _param(gm, a.get("bias"))
    if mean is None or var is None:
        return None
    bn = AnyRankBatchNorm(mean.numel(), eps=a.get("eps", 1e-5), affine=w is not None)
    bn.running_mean, bn.running_var = mean, var
    if w is not None:
        bn.weight.data, bn.bias.data = w.detach(), b.detach()
    return bn.eval()


def _module_path(gm: GraphModule, node: Node, op: str) -> str:
    """Put the new module beside the parameters it uses: 'blk.conv.weight' -> 'blk.conv.conv'."""
    w = next((a for a in node.all_input_nodes if a.op == "get_attr"), None)
    owner = w.target.rpartition(".")[0] if w is not None else ""
    base = f"{owner}.{op}" if owner else op
    path, i = base, 1
    while _exists(gm, path):
        path, i = f"{base}_{i}", i + 1
    return path


def _exists(gm: GraphModule, path: str) -> bool:
    try:
        fetch_attr(gm, path)
        return True
    except AttributeError:
        return False


_BUILDERS = {OpKind.CONV: (_conv, "conv"), OpKind.LINEAR: (_linear, "linear"), OpKind.BATCHNORM: (_batchnorm, "bn")}


def _same_call(node: Node) -> tuple:
    """What makes two functional calls one layer: the op, its parameters (get_attr targets) and its settings."""

    def key(v):
        if isinstance(v, Node):
            return ("get_attr", v.target) if v.op == "get_attr" else ("node", v.name)
        return tuple(key(x) for x in v) if isinstance(v, (list, tuple)) else v

    return node.target, key(node.args[1:]), tuple(sorted((k, key(v)) for k, v in node.kwargs.items()))


_SDPA = {F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default}
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")


def _attention_scale(query: torch.Tensor) -> float:
    """scaled_dot_product_attention's default scale, 1 / sqrt(head dim)."""
    return query.shape[-1] ** -0.5


def _masked(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """An attention mask as scaled_dot_product_attention applies it: a bool mask keeps where True, a float one
    adds (a graph input may pass None)."""
    if mask is None:
        return scores
    return scores.masked_fill(~mask, -torch.inf) if mask.dtype == torch.bool else scores + mask


def _write_out_attention(gm: GraphModule, node: Node) -> bool:
    """softmax(q @ k^T * scale + mask) @ v in place of an inference-time scaled_dot_product_attention call (no
    dropout, not causal, no grouped heads; a call outside that is left as it is)."""
    a = _args(node, _SDPA_ARGS)
    if a.get("dropout_p", 0.0) or a.get("is_causal", False) or node.kwargs.get("enable_gqa", False):
        return False
    query, key, value, mask, scale = a["query"], a["key"], a["value"], a.get("attn_mask"), a.get("scale")
    g = gm.graph
    with g.inserting_before(node):
        scores = g.call_function(torch.matmul, (query, g.call_function(torch.transpose, (key, -2, -1))))
        if scale is None:
            scale = g.call_function(_attention_scale, (query,))
        scores = g.call_function(operator.mul, (scores, scale))
        if mask is not None:
            scores = g.call_function(_masked, (scores, mask))
        weights = g.call_function(torch.softmax, (scores, -1))
        out = g.call_function(torch.matmul, (weights, value))
    out.meta = {k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack")}
    node.replace_all_uses_with(out)
    g.erase_node(node)
    return True


class Normalize(FxqPass):
    """Rewrite functional conv/linear/batch-norm whose weights are graph constants as call_module nodes (calls of
    one layer at several sites, the same parameters and settings, call one module, as symbolic tracing has it),
    and write out scaled_dot_product_attention."""

    def call(self, gm: GraphModule) -> PassResult:
        n = 0
        made: dict[tuple, str] = {}
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target in _SDPA:
                n += _write_out_attention(gm, node)
                continue
            built = _BUILDERS.get(kind_of(gm, node))
            mod = built[0](gm, node) if built else None
            if mod is None:
                continue
            key = _same_call(node)
            path = made.get(key)
            if path is None:
                path = made[key] = _module_path(gm, node, built[1])
                gm.add_submodule(path, mod.eval())  # PTQ works on the inference graph
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(path, (node.args[0],))
            new.meta = dict(node.meta)
            _replace(node, new)
            n += 1
        if n:
            gm.graph.eliminate_dead_code()
            gm.delete_all_unused_submodules()
            gm.recompile()
        return PassResult(gm, modified=n > 0)


def _replace(node: Node, new: Node) -> None:
    if node.target in _BN_TUPLE:  # users take item 0 of the tuple
        for user in list(node.users):
            if user.target is operator.getitem and user.args[1] == 0:
                user.replace_all_uses_with(new)
    else:
        node.replace_all_uses_with(new)
