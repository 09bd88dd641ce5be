"""Op tables: what each fx node is, whatever front-end produced it (nn modules, torch functions, ATen ops)."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.passes.shape_prop import TensorMetadata

from fxq.errors import ConfigError
from fxq.ir.meta import OpKind

__all__ = [
    "set_eval_",
    "channels_last_",
    "device_of",
    "pick_device",
    "kind_of",
    "module_of",
    "is_depthwise",
    "act_module_name",
    "fetch_attr",
    "is_float_tensor",
    "is_nonnegative",
    "is_norm",
    "WEIGHTED_MODULES",
]

aten = torch.ops.aten

WEIGHTED_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

_MODULES: dict[type, OpKind] = {
    nn.Conv1d: OpKind.CONV,
    nn.Conv2d: OpKind.CONV,
    nn.Conv3d: OpKind.CONV,
    nn.Linear: OpKind.LINEAR,
    nn.BatchNorm1d: OpKind.BATCHNORM,
    nn.BatchNorm2d: OpKind.BATCHNORM,
    nn.BatchNorm3d: OpKind.BATCHNORM,
    **dict.fromkeys(
        (
            nn.ReLU,
            nn.ReLU6,
            nn.Hardtanh,
            nn.SiLU,
            nn.Hardswish,
            nn.GELU,
            nn.Sigmoid,
            nn.Hardsigmoid,
            nn.Tanh,
            nn.LeakyReLU,
            nn.ELU,
            nn.Mish,
            nn.PReLU,
            nn.Softplus,
        ),
        OpKind.ACTIVATION,
    ),
    **dict.fromkeys(
        (
            nn.Identity,
            nn.Dropout,
            nn.Dropout1d,
            nn.Dropout2d,
            nn.Dropout3d,
            nn.Flatten,
            nn.Unflatten,
            nn.MaxPool1d,
            nn.MaxPool2d,
            nn.MaxPool3d,
            nn.ZeroPad1d,
            nn.ZeroPad2d,
            nn.ZeroPad3d,
        ),
        OpKind.PASSTHROUGH,
    ),
}

_FUNCTIONS: dict[object, OpKind] = {
    **dict.fromkeys(
        (
            F.conv1d,
            F.conv2d,
            F.conv3d,
            torch.conv1d,
            torch.conv2d,
            torch.conv3d,
            aten.conv1d.default,
            aten.conv2d.default,
            aten.conv3d.default,
        ),
        OpKind.CONV,
    ),
    **dict.fromkeys((F.linear, torch._C._nn.linear, aten.linear.default), OpKind.LINEAR),
    **dict.fromkeys(
        (operator.matmul, torch.matmul, torch.bmm, torch.mm, aten.matmul.default, aten.bmm.default, aten.mm.default),
        OpKind.MATMUL,
    ),
    **dict.fromkeys(
        (F.batch_norm, aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default), OpKind.BATCHNORM
    ),
    **dict.fromkeys(
        (
            F.relu,
            torch.relu,
            F.relu6,
            F.hardtanh,
            F.silu,
            F.hardswish,
            F.gelu,
            torch._C._nn.gelu,
            torch.sigmoid,
            F.sigmoid,
            F.hardsigmoid,
            torch.tanh,
            F.tanh,
            F.leaky_relu,
            F.elu,
            F.mish,
            aten.relu.default,
            aten.relu_.default,
            aten.hardtanh.default,
            aten.hardtanh_.default,
            aten.silu.default,
            aten.silu_.default,
            aten.hardswish.default,
            aten.hardswish_.default,
            aten.gelu.default,
            aten.sigmoid.default,
            aten.hardsigmoid.default,
            aten.tanh.default,
            aten.relu6.default,
            aten.leaky_relu.default,
        ),
        OpKind.ACTIVATION,
    ),
    **dict.fromkeys((operator.add, operator.iadd, torch.add, aten.add.Tensor, aten.add_.Tensor), OpKind.ADD),
    **dict.fromkeys((torch.cat, torch.concat, aten.cat.default), OpKind.CAT),
    **dict.fromkeys(
        (
            operator.getitem,
            torch.flatten,
            torch.reshape,
            torch.permute,
            torch.transpose,
            torch.squeeze,
            torch.unsqueeze,
            F.dropout,
            F.pad,
            F.max_pool1d,
            F.max_pool2d,
            F.max_pool3d,
            torch.chunk,
            torch.split,
            torch.unbind,
            aten.view.default,
            aten.reshape.default,
            aten._unsafe_view.default,
            aten.flatten.using_ints,
            aten.permute.default,
            aten.transpose.int,
            aten.squeeze.dim,
            aten.unsqueeze.default,
            aten.clone.default,
            aten.dropout.default,
            aten.max_pool2d.default,
            aten.t.default,
            aten.expand.default,
            aten.contiguous.default,
            aten.slice.Tensor,
            aten.select.int,
            aten.split.Tensor,
            aten.chunk.default,
            aten.unbind.int,
            aten.alias.default,
            aten.detach.default,
            aten.constant_pad_nd.default,
        ),
        OpKind.PASSTHROUGH,
    ),
}

_METHODS: dict[str, OpKind] = {
    **dict.fromkeys(("relu", "relu_", "sigmoid", "tanh", "sigmoid_", "tanh_"), OpKind.ACTIVATION),
    **dict.fromkeys(("add", "add_", "__add__"), OpKind.ADD),
    **dict.fromkeys(("matmul", "bmm", "mm"), OpKind.MATMUL),
    **dict.fromkeys(
        (
            "view",
            "reshape",
            "flatten",
            "permute",
            "transpose",
            "contiguous",
            "squeeze",
            "unsqueeze",
            "expand",
            "chunk",
            "split",
            "unbind",
            "unflatten",
            "clone",
            "detach",
            "t",
        ),
        OpKind.PASSTHROUGH,
    ),
}

# Activations whose output is never negative: their quantizer is unsigned (one more bit of resolution).
_NONNEG_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Softmax)
_NONNEG_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.relu6,
    torch.sigmoid,
    F.sigmoid,
    F.hardsigmoid,
    F.softmax,
    torch.softmax,
    aten.relu.default,
    aten.relu_.default,
    aten.relu6.default,
    aten.sigmoid.default,
    aten.hardsigmoid.default,
    aten._softmax.default,
}
_NONNEG_METHODS = {"relu", "relu_", "sigmoid", "softmax"}


def set_eval_(module: nn.Module) -> nn.Module:
    """module.eval(), also for torch.export's unlifted modules, whose own eval() refuses (their graph is frozen)."""
    return nn.Module.train(module, False)


def channels_last_(module: nn.Module) -> nn.Module:
    """The module's 4-d parameters and buffers in channels-last memory order, the rest as they are (torch's
    module.to(memory_format=torch.channels_last) also takes the 5-d ones, and refuses them: a windowed attention's
    mask)."""
    return module._apply(lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t)


def device_of(module: nn.Module) -> torch.device:
    """Where a module's parameters live (CPU for a parameter-free module)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def pick_device(name: str = "auto") -> torch.device:
    """Where to run: "auto" is the GPU when one is visible, else the CPU; a CUDA device that is not there is a
    clear error, not a crash deep in the first pass."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; give cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: no CUDA device is visible here; use cpu or auto")
    return device


def fetch_attr(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def act_module_name(node: Node) -> str:
    """Observers and the quantizers that replace them share one module name per observed node."""
    return f"fxq_act_{node.name}"


def is_depthwise(layer: nn.Module) -> bool:
    """A convolution whose every output channel reads one input channel: its integer kernels sum no products
    across channels."""
    return isinstance(layer, nn.modules.conv._ConvNd) and layer.groups > 1 and layer.in_channels == layer.groups


def module_of(gm: GraphModule, node: Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def kind_of(gm: GraphModule, node: Node) -> OpKind:
    """Classify a node; unknown ops count as OTHER (their output gets its own quantizer)."""
    if node.op == "placeholder":
        return OpKind.INPUT
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return _MODULES.get(type(mod)) or _kind_by_isinstance(mod)
    if node.op == "call_function":
        return _FUNCTIONS.get(node.target, OpKind.OTHER)
    if node.op == "call_method":
        return _METHODS.get(node.target, OpKind.OTHER)
    return OpKind.OTHER


def grid_source(gm: GraphModule, node: Node, quantizer: type[nn.Module]) -> Node | None:
    """The `quantizer` module call whose grid `node`'s value is on, found through ops that only move values
    (maxpool, flatten, views, dropout); None when there is none."""
    while True:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), quantizer):
            return node
        if kind_of(gm, node) is not OpKind.PASSTHROUGH or not node.args or not isinstance(node.args[0], Node):
            return None
        node = node.args[0]


def _kind_by_isinstance(mod: nn.Module) -> OpKind:
    # subclasses keep their base's kind only for passthrough/activation; a Conv2d subclass with its own
    # forward is traced through (it is not a leaf), so a call_module of it never reaches here.
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return OpKind.BATCHNORM
    for t, k in _MODULES.items():
        if isinstance(mod, t) and k in (OpKind.ACTIVATION, OpKind.PASSTHROUGH):
            return k
    fxq_kind = getattr(mod, "fxq_kind", None)
    return fxq_kind if isinstance(fxq_kind, OpKind) else OpKind.OTHER


def is_nonnegative(gm: GraphModule, node: Node) -> bool:
    """True when the op's output cannot be negative whatever its input (ReLU family, sigmoid, softmax)."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.Hardtanh):
            return mod.min_val >= 0
        return isinstance(mod, _NONNEG_MODULES)
    if node.op == "call_function":
        if node.target in (F.hardtanh, aten.hardtanh.default, aten.hardtanh_.default):
            lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
            return isinstance(lo, (int, float)) and lo >= 0
        return node.target in _NONNEG_FUNCTIONS
    return node.op == "call_method" and node.target in _NONNEG_METHODS


# Norms over a token's features: devices compute them in float (their statistics need more than 8 bits).
_NORM_MODULES = (nn.LayerNorm, nn.RMSNorm)
_NORM_FUNCTIONS = {
    F.layer_norm,
    torch.layer_norm,
    F.rms_norm,
    aten.layer_norm.default,
    aten.native_layer_norm.default,
    aten.rms_norm.default,
}


def is_norm(gm: GraphModule, node: Node) -> bool:
    """True for a layer norm or RMS norm (module, function or ATen op)."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _NORM_MODULES)
    return node.op == "call_function" and node.target in _NORM_FUNCTIONS


def is_float_tensor(node: Node) -> bool:
    tm = node.meta.get("tensor_meta")
    return isinstance(tm, TensorMetadata) and tm.dtype.is_floating_point
