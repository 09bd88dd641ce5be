"""ONNX QDQ export of a quantized graph, in the form ONNX Runtime fuses into integer kernels.

torch.onnx (TorchScript exporter) writes the graph; every quantizer comes out as QDQ operators built from
the lowered form (fxq.backends.lowering): a weight is DequantizeLinear of its int8 codes (axis 0, zero point 0),
a conv/linear bias on the int32 grid s_x * s_w is DequantizeLinear of its int32 codes, an activation is
QuantizeLinear -> DequantizeLinear on uint8 (torch's fake-quantize, as the exporter writes it). ONNX Runtime fuses these into QLinearConv, QGemm, QLinearAdd.

Weights of 4 bits or fewer can ship packed (`WeightStorage.PACKED`): INT4 initializers (opset 21) read by the
same DequantizeLinear; 2-bit weights take INT4 too (ONNX Runtime's QDQ fusion breaks on INT2). ONNX Runtime's CPU
kernels do not fuse INT4 weights: it dequantizes them and runs a float conv or gemm, so the gain is the file's
and the weights' memory, not speed; `WeightStorage.INT8` keeps every weight in int8 for the integer kernels.
Each layer's width, the target and its integer form go into the model's metadata.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from enum import Enum

import numpy as np
import torch
from torch import Tensor, nn
from torch.fx import GraphModule

from fxq.backends.check import CheckLimits, ExportCheck, check_lowered, enforce
from fxq.backends.lowering import LoweredActivation, LoweredWeight, lowered_copy
from fxq.errors import ConfigError
from fxq.ir.meta import gq
from fxq.ir.ops import device_of
from fxq.quant.modules import layer_forward
from fxq.targets import ISA

__all__ = ["WeightStorage", "export_onnx", "onnx_model", "export_float_onnx", "ort_session", "OPSET", "PACKED_OPSET"]

OPSET = 17  # the TorchScript exporter's opset for the graph
PACKED_OPSET = 21  # the first with INT4 DequantizeLinear


class WeightStorage(Enum):
    INT8 = "int8"  # every weight an int8 initializer: ONNX Runtime's integer kernels run every layer
    PACKED = "packed"  # weights of 4 bits or fewer as INT4: half the bytes, run dequantized by ONNX Runtime's CPU


class _Dequantize(torch.autograd.Function):
    """DequantizeLinear of integer codes, per channel along axis 0 (or per tensor for a 0-d scale)."""

    @staticmethod
    def forward(ctx, codes: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
        shape = (-1, *([1] * (codes.dim() - 1))) if scale.dim() else ()
        return (codes.float() - zero_point.float().reshape(shape)) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, codes, scale, zero_point):
        return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=0)


class _OnnxWeight(nn.Module):
    """A lowered conv/linear: its weight from int8 codes, its bias from int32 codes where it is on that grid."""

    def __init__(self, name: str, w: LoweredWeight):
        super().__init__()
        self.layer, self.bits = w.layer, w.bits
        self.register_buffer("codes", w.codes)
        self.register_buffer("scale", w.scale)
        self.register_buffer("zero", torch.zeros(w.scale.numel(), dtype=torch.int8))
        self.int_bias = w.bias_codes is not None
        if self.int_bias:
            self.register_buffer("bias_codes", w.bias_codes)
            self.register_buffer("bias_scale", w.bias_scale)
            self.register_buffer("bias_zero", torch.zeros_like(w.bias_codes))

    def forward(self, x: Tensor) -> Tensor:
        w = _Dequantize.apply(self.codes, self.scale, self.zero)
        b = _Dequantize.apply(self.bias_codes, self.bias_scale, self.bias_zero) if self.int_bias else self.layer.bias
        return layer_forward(self.layer, x, w, b)


class _OnnxActivation(nn.Module):
    """torch's fake-quantize on the uint8 grid, which the exporter writes as QuantizeLinear -> DequantizeLinear;
    a grid narrower than 8 bits clamps first to its range (a Clip: the same values as clamping the codes)."""

    def __init__(self, name: str, a: LoweredActivation):
        super().__init__()
        self.scale, self.zero_point = a.scale, a.zero_point
        self.narrow = (-a.zero_point * a.scale, (a.quant_max - a.zero_point) * a.scale) if a.quant_max < 255 else None

    def forward(self, x: Tensor) -> Tensor:
        if self.narrow is not None:
            x = torch.clamp(x, *self.narrow)
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, 0, 255)


def ort_session(model: str | bytes, threads: int | None = None):
    """An ONNX Runtime CPU session of a model file (or its bytes)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or torch.get_num_threads()
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


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


def onnx_model(
    qgm: GraphModule, example_inputs: tuple, storage: WeightStorage = WeightStorage.PACKED, isa: ISA | None = None
):
    """`qgm` (an fxq fake-quant GraphModule) as an in-memory QDQ onnx.ModelProto with a dynamic batch dimension;
    `isa` (default: the one the graph was annotated for) goes into its metadata."""
    import onnx

    storage = WeightStorage(storage)
    gm = lowered_copy(qgm, _OnnxWeight, _OnnxActivation).eval()
    widths = {name: m.bits for name, m in gm.named_modules() if isinstance(m, _OnnxWeight)}
    device = device_of(gm)
    buf = io.BytesIO()
    export_float_onnx(gm, tuple(x.to(device) for x in example_inputs), buf)
    model = onnx.load_from_string(buf.getvalue())
    if storage is WeightStorage.PACKED and any(b <= 4 for b in widths.values()):
        model = _pack_narrow_weights(model, {f"{n}.codes": b for n, b in widths.items() if b <= 4})
    target = gq(qgm).target
    isa = isa or (target.isa if target is not None else None)
    meta = {
        "fxq.isa": isa.value if isa else "",
        "fxq.integer_form": isa.form if isa else "",
        "fxq.weight_storage": storage.value,
        "fxq.weight_bits": json.dumps(widths),
    }
    onnx.helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    return model


def export_onnx(
    qgm: GraphModule,
    example_inputs: tuple,
    path: str | os.PathLike,
    storage: WeightStorage = WeightStorage.PACKED,
    check_inputs: Tensor | None = None,
    limits: CheckLimits = CheckLimits(),
    force: bool = False,
    isa: ISA | None = None,
) -> ExportCheck:
    """Write `qgm` as a QDQ ONNX model, after running it in ONNX Runtime next to the reference on `check_inputs`
    (calibration images; default: the example inputs). A check that fails raises ExportMismatch and writes
    nothing, unless `force`. The check's figures go into the model's metadata; the file is written atomically."""
    import onnx

    model = onnx_model(qgm, example_inputs, storage, isa)
    inputs = check_inputs if check_inputs is not None else example_inputs[0]
    session = ort_session(model.SerializeToString())
    check = check_lowered(
        qgm, lambda x: session.run(None, {"input": x.cpu().numpy()})[0], inputs, "onnxruntime", limits
    )
    if not force:
        enforce(check, limits, "onnx export")
    props = {p.key: p.value for p in model.metadata_props}
    onnx.helper.set_model_props(model, {**props, "fxq.check": json.dumps(check.to_dict())})
    tmp = f"{os.fspath(path)}.tmp"
    try:
        onnx.save(model, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return check


def _pack_narrow_weights(model, narrow: dict[str, int]):
    """Weights of <= 4 bits (their initializers named in `narrow`) packed, at opset 21: a linear layer's as one
    com.microsoft MatMulNBits (4-bit blocks, dequantized inside the matmul: far faster on ONNX Runtime's CPU
    than a DequantizeLinear feeding a float Gemm), every other one as INT4 with INT4 zero points."""
    from onnx import TensorProto, helper, version_converter

    model = version_converter.convert_version(model, PACKED_OPSET)
    consts = _constants(model)
    readers = {n.input[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    users = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    for name in narrow:
        if name not in consts or name not in readers:
            raise ConfigError(f"onnx export: the weight codes '{name}' did not come out as an initializer")
        codes = consts[name].astype(np.int8)
        dq = readers[name]
        gemm = users.get(dq.output[0], [])
        if len(gemm) == 1 and _is_linear_gemm(gemm[0]) and gemm[0].input[1] == dq.output[0]:
            _to_matmul_nbits_(model, gemm[0], name, codes, consts[dq.input[1]], consts, readers)
            continue
        packed = [
            helper.make_tensor(f"{name}_int4", TensorProto.INT4, codes.shape, _nibbles(codes), raw=True),
            helper.make_tensor(
                f"{name}_int4_zero",
                TensorProto.INT4,
                codes.shape[:1],
                _nibbles(np.zeros(codes.shape[0], np.int8)),
                raw=True,
            ),
        ]
        model.graph.initializer.extend(packed)
        dq.input[0], dq.input[2] = packed[0].name, packed[1].name
    _drop_unused_(model)
    return model


def _is_linear_gemm(node) -> bool:
    """Gemm(x, W, b) as torch writes a linear layer: B transposed, alpha = beta = 1."""
    attrs = {a.name: a for a in node.attribute}
    return (
        node.op_type == "Gemm"
        and attrs.get("transB") is not None
        and attrs["transB"].i == 1
        and ("transA" not in attrs or attrs["transA"].i == 0)
        and all(k not in attrs or attrs[k].f == 1.0 for k in ("alpha", "beta"))
    )


_NBITS_BLOCK = 128  # a block length ONNX Runtime's 4-bit kernels support; per-channel steps repeat over blocks


def _to_matmul_nbits_(
    model, gemm, name: str, codes: np.ndarray, scale: np.ndarray, consts: dict, readers: dict
) -> None:
    """Replace a linear layer's Gemm(x, DQ(codes), b) by MatMulNBits(x, packed codes, steps, bias): unsigned 4-bit
    codes with the default zero point 8 (code + 8), K padded to whole blocks with the zero point."""
    from onnx import helper, numpy_helper

    n, k = codes.shape
    blocks = -(-k // _NBITS_BLOCK)
    u = np.full((n, blocks * _NBITS_BLOCK), 8, np.uint8)
    u[:, :k] = (codes.astype(np.int16) + 8).astype(np.uint8)
    u = u.reshape(n, blocks, _NBITS_BLOCK)
    blob = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
    steps = np.repeat(scale.astype(np.float32).reshape(n, 1), blocks, 1).reshape(-1)
    inits = [numpy_helper.from_array(blob, f"{name}_nbits"), numpy_helper.from_array(steps, f"{name}_nbits_scale")]
    inputs = [gemm.input[0], inits[0].name, inits[1].name]
    if len(gemm.input) > 2 and gemm.input[2]:
        bias_dq = next((r for r in readers.values() if r.output[0] == gemm.input[2]), None)
        if bias_dq is None or bias_dq.input[0] not in consts:
            raise ConfigError(f"onnx export: the bias of '{gemm.name}' is not a dequantized constant")
        bias = (consts[bias_dq.input[0]].astype(np.float32) - consts[bias_dq.input[2]].astype(np.float32)) * consts[
            bias_dq.input[1]
        ].astype(np.float32)  # what DequantizeLinear computes, in float32
        inits.append(numpy_helper.from_array(bias.astype(np.float32), f"{name}_nbits_bias"))
        inputs += ["", "", inits[-1].name]  # no zero points (default 8), no g_idx, then the bias
    model.graph.initializer.extend(inits)
    node = helper.make_node(
        "MatMulNBits",
        inputs,
        list(gemm.output),
        name=f"{gemm.name}_nbits",
        domain="com.microsoft",
        K=k,
        N=n,
        bits=4,
        block_size=_NBITS_BLOCK,
    )
    idx = list(model.graph.node).index(gemm)
    model.graph.node.remove(gemm)
    model.graph.node.insert(idx, node)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _constants(model) -> dict[str, np.ndarray]:
    """Initializers and Constant-node values by output name, through the Identity nodes the exporter shares equal
    constants with."""
    from onnx import numpy_helper

    found = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:  # graph order: an Identity's input is known before it
        if n.op_type == "Constant":
            found[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        elif n.op_type == "Identity" and n.input[0] in found:
            found[n.output[0]] = found[n.input[0]]
    return found


def _nibbles(values: np.ndarray) -> bytes:
    """Signed 4-bit values packed two to a byte, the first in the low nibble (ONNX's INT4 layout)."""
    u = (values.astype(np.int8).flatten() & 0x0F).astype(np.uint8)
    if u.size % 2:
        u = np.append(u, np.uint8(0))
    return (u[0::2] | (u[1::2] << 4)).tobytes()


def _drop_unused_(model) -> None:
    """Nodes and initializers nothing reads any more (a weight's DequantizeLinear a MatMulNBits replaced)."""
    while True:
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        dead = [n for n in model.graph.node if not any(o in used for o in n.output)]
        for n in dead:
            model.graph.node.remove(n)
        if not dead:
            break
    for t in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(t)
