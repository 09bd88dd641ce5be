"""ONNX QDQ export of a quantized graph, in the form ONNX Runtime fuses into integer kernels.

torch.onnx (TorchScript exporter) turns each fake-quantizer into QuantizeLinear + DequantizeLinear. Then, on the
ONNX graph: every weight Q is folded into an int8 initializer read by its DQ (weights ship as integers), float
bias of a conv/gemm fed by two DQs becomes int32 with scale s_x * s_w (what ORT's QLinearConv expects), and
float-to-float Casts go. Weights narrower than 8 bits ship as int8 holding the narrow grid (opset 17 has no
int4/int2 QDQ; the values stay in [-2^(b-1), 2^(b-1) - 1]).
"""

from __future__ import annotations

import copy
import io
import os
import warnings

import numpy as np
import torch
from torch import nn
from torch.fx import GraphModule

from fxq.errors import UnsupportedOp
from fxq.meta import without_graph_state
from fxq.modules import ActQuant, QuantWeight, layer_forward
from fxq.ops import device_of

__all__ = ["export_onnx", "export_float_onnx", "OPSET"]

OPSET = 17


class _GridWeight(nn.Module):
    """Export form of QuantWeight: the weight already on its grid, re-quantized exactly on the int8 grid."""

    def __init__(self, qw: QuantWeight):
        super().__init__()
        self.layer = qw.layer
        self.register_buffer("w", qw.quantized_weight().detach().float())
        self.register_buffer("scale", qw.scale.detach().float())
        self.register_buffer("zero", torch.zeros(qw.scale.numel(), dtype=torch.int32))

    def forward(self, x):
        w = torch.fake_quantize_per_channel_affine(self.w, self.scale, self.zero, 0, -128, 127)
        return layer_forward(self.layer, x, w, self.layer.bias)


class _QDQActivation(nn.Module):
    """Export form of ActQuant: torch's fake-quantize op, which the ONNX exporter turns into Q + DQ.

    A signed grid [-128, 127] ships as uint8 with zero point 128: the same values, and ONNX Runtime's x86
    integer convolutions fuse u8 activations with s8 weights (s8 activations leave convs unfused)."""

    def __init__(self, aq: ActQuant):
        super().__init__()
        self.scale, self.zero = float(aq.scale), -aq.spec.qmin
        self.qmax = aq.spec.qmax - aq.spec.qmin

    def forward(self, x):
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero, 0, self.qmax)


def _export_form(qgm: GraphModule) -> GraphModule:
    with without_graph_state(qgm):
        gm = copy.deepcopy(qgm)
    for name, mod in list(gm.named_modules()):
        if isinstance(mod, ActQuant):
            gm.add_submodule(name, _QDQActivation(mod))
        if isinstance(mod, QuantWeight):
            if not mod.spec.per_channel:
                raise UnsupportedOp(f"onnx export: per-tensor weight quantizer at '{name}' is not supported yet")
            gm.add_submodule(name, _GridWeight(mod))
    return gm


def export_float_onnx(model: nn.Module, example_inputs: tuple, f) -> None:
    """torch.onnx's TorchScript exporter at fxq's opset, input 'input' and output 'output', dynamic batch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            example_inputs,
            f,
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )


def export_onnx(qgm: GraphModule, example_inputs: tuple, path: str | os.PathLike) -> None:
    """Write `qgm` (an fxq fake-quant GraphModule) as a QDQ ONNX model with a dynamic batch dimension."""
    import onnx

    gm = _export_form(qgm).eval()
    device = device_of(gm)
    example = tuple(x.to(device) for x in example_inputs)
    buf = io.BytesIO()
    export_float_onnx(gm, example, buf)
    model = onnx.load_from_string(buf.getvalue())
    _fold_weight_quantizers_(model)
    _drop_float_casts_(model)
    _quantize_biases_(model)
    onnx.checker.check_model(model)
    tmp = f"{os.fspath(path)}.tmp"
    onnx.save(model, tmp)
    os.replace(tmp, path)


def _tensors(model) -> dict:
    """Initializers and Constant-node values by output name (the exporter emits scales as either)."""
    from onnx import numpy_helper

    found = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:  # graph order: an Identity's input is known before it
        if n.op_type == "Constant":
            found[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        elif n.op_type == "Identity" and n.input[0] in found:  # the exporter shares equal constants this way
            found[n.output[0]] = found[n.input[0]]
    return found


def _axis(node) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def _fold_weight_quantizers_(model) -> None:
    from onnx import numpy_helper

    init = {t.name: t for t in model.graph.initializer}
    consts = _tensors(model)
    for q in [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in init]:
        w, scale = consts[q.input[0]], consts[q.input[1]]
        shape = [1] * w.ndim
        if scale.ndim:
            shape[_axis(q)] = -1
        # fxq weights are symmetric: zero point 0 (the exporter may compute it through a Cast; pin it)
        ints = np.clip(np.round(w / scale.reshape(shape)), -128, 127).astype(np.int8)
        name = f"{q.input[0]}_quantized"
        model.graph.initializer.extend(
            [
                numpy_helper.from_array(ints, name),
                numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{name}_zero"),
            ]
        )
        for n in model.graph.node:
            if q.output[0] in n.input:  # the DQ
                n.input[:] = [name, n.input[1], f"{name}_zero"]
        model.graph.node.remove(q)
    _drop_unused_initializers_(model)


def _drop_float_casts_(model) -> None:
    from onnx import TensorProto

    for cast in [n for n in model.graph.node if n.op_type == "Cast"]:
        if next(a.i for a in cast.attribute if a.name == "to") != TensorProto.FLOAT:
            continue
        src = next((n for n in model.graph.node if cast.input[0] in n.output), None)
        if src is None or src.op_type != "DequantizeLinear":  # only casts of what is float already
            continue
        for n in model.graph.node:
            n.input[:] = [cast.input[0] if i == cast.output[0] else i for i in n.input]
        model.graph.node.remove(cast)


def _quantize_biases_(model) -> None:
    """Conv/Gemm with DQ(x), DQ(w) and a float bias initializer: bias -> DQ(int32, s_x * s_w)."""
    from onnx import helper, numpy_helper

    init = {t.name: t for t in model.graph.initializer}
    consts = _tensors(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in [n for n in model.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) == 3]:
        dq_x, dq_w = producer.get(node.input[0]), producer.get(node.input[1])
        if node.input[2] not in init or not all(
            d is not None and d.op_type == "DequantizeLinear" for d in (dq_x, dq_w)
        ):
            continue
        if dq_x.input[1] not in consts or dq_w.input[1] not in consts:
            continue  # a scale computed at run time: leave the bias float
        scale = (consts[dq_x.input[1]] * consts[dq_w.input[1]]).astype(np.float32).reshape(-1)
        bias = consts[node.input[2]]
        ints = np.round(bias / scale)
        if not np.all(np.abs(ints) < 2**31 - 1):
            continue  # would overflow int32: keep the float bias (ORT then runs this layer unfused)
        ints = ints.astype(np.int32)
        name = node.input[2]
        model.graph.initializer.extend(
            [
                numpy_helper.from_array(ints, f"{name}_int32"),
                numpy_helper.from_array(scale, f"{name}_scale"),
                numpy_helper.from_array(np.zeros_like(ints), f"{name}_zero"),
            ]
        )
        dq = helper.make_node(
            "DequantizeLinear",
            [f"{name}_int32", f"{name}_scale", f"{name}_zero"],
            [f"{name}_dequantized"],
            axis=0,
            name=f"{name}_DequantizeLinear",
        )
        idx = list(model.graph.node).index(node)
        model.graph.node.insert(idx, dq)
        node.input[2] = f"{name}_dequantized"
    _drop_unused_initializers_(model)


def _drop_unused_initializers_(model) -> None:
    used = {i for n in model.graph.node for i in n.input}
    for t in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(t)
