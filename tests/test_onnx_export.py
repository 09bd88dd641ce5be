import json

import numpy as np
import pytest
import torch
from torch import nn

import fxq
from fxq.targets import INT8, ISA
from tests.conftest import seeded

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, numpy_helper  # noqa: E402

from fxq.backends import check as check_module  # noqa: E402
from fxq.backends.check import CheckLimits  # noqa: E402
from fxq.backends.onnx import WeightStorage, export_onnx, ort_session  # noqa: E402
from fxq.errors import ExportMismatch  # noqa: E402
from fxq.quant.modules import QuantWeight  # noqa: E402


def _quantized(model, bits=8, target=INT8, shape=(8, 3, 16, 16)):
    return fxq.quantize(
        model,
        [seeded(*shape, seed=i) for i in range(2)],
        fxq.PTQConfig(target=target.with_bits(bits), progress=False),
    ).model


def _step(qgm) -> float:
    return float(qgm.get_submodule("fxq_act_head").scale)  # the output quantizer's step


def _inits(path) -> dict:
    return {t.name: t for t in onnx.load(str(path)).graph.initializer}


class WideNet(nn.Module):
    """Enough weights (about 0.3 M) that the file is mostly weights."""

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(*[nn.Sequential(nn.Conv2d(c, 96, 3, padding=1), nn.ReLU()) for c in (3, 96, 96, 96)])
        self.head = nn.Linear(96, 10)

    def forward(self, x):
        return self.head(self.convs(x).mean((2, 3)))


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_onnx_runtime_matches_the_reference(tiny_net, tmp_path, bits):
    """On this machine's own target the integer kernels compute the reference: only requantization ties may
    differ (a step, which later layers may carry)."""
    qgm = _quantized(tiny_net, bits)
    path = tmp_path / "tiny.onnx"
    export_onnx(qgm, (seeded(1, 3, 16, 16),), path)
    x = seeded(64, 3, 16, 16, seed=7)  # another batch size: the batch dimension is dynamic
    out = ort_session(str(path)).run(None, {"input": x.numpy()})[0]
    ref = qgm(x).detach().numpy()
    diff = np.abs(out - ref) / _step(qgm)
    assert diff.max() <= 2 + 1e-3 and (diff < 1e-3).mean() >= 0.95
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.95


def test_the_qdq_graph_run_in_float_is_the_reference(tiny_net, tmp_path):
    """With ORT's graph rewrites off, the QDQ graph runs in float exactly as fxq's reference does: int32 biases
    that dequantize to the reference's own biases, the same quantizers. Only rounding ties may differ."""
    qgm = _quantized(tiny_net)
    path = tmp_path / "tiny.onnx"
    export_onnx(qgm, (seeded(1, 3, 16, 16),), path)
    inits = {n: numpy_helper.to_array(t) for n, t in _inits(path).items()}
    biases = [n for n in inits if n.endswith(".bias_codes")]
    assert len(biases) == 4
    for name in biases:
        layer = name[: -len(".bias_codes")]
        bias = qgm.get_submodule(layer).layer.bias.detach().numpy()
        assert inits[name].dtype == np.int32
        assert np.array_equal(inits[name].astype(np.float32) * inits[f"{layer}.bias_scale"], bias), name
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = seeded(64, 3, 16, 16, seed=3)
    out, ref = sess.run(None, {"input": x.numpy()})[0], qgm(x).detach().numpy()
    assert np.abs(out - ref).max() <= _step(qgm) * 1.001 and (out == ref).mean() > 0.95


@pytest.mark.parametrize("bits", [8, 4])
def test_weights_ship_as_the_modules_own_codes(tiny_net, tmp_path, bits):
    """int8 storage: each weight is its module's hard codes as int8; packed: as INT4, at opset 21."""
    qgm = _quantized(tiny_net, bits)
    for storage in WeightStorage:
        path = tmp_path / f"{storage.value}.onnx"
        export_onnx(qgm, (seeded(1, 3, 16, 16),), path, storage=storage)
        model = onnx.load(str(path))
        inits = {t.name: t for t in model.graph.initializer}
        packed = storage is WeightStorage.PACKED and bits <= 4
        assert model.opset_import[0].version == (21 if packed else 17)
        for name, mod in qgm.named_modules():
            if not isinstance(mod, QuantWeight):
                continue
            want = mod.hard_codes().long().numpy()
            if packed and isinstance(mod.layer, nn.Linear):  # MatMulNBits: unsigned nibbles, zero point 8
                blob = numpy_helper.to_array(inits[f"{name}.codes_nbits"]).reshape(want.shape[0], -1)
                got = np.stack([blob & 0x0F, blob >> 4], -1).reshape(want.shape[0], -1)[:, : want.shape[1]]
                assert np.array_equal(got.astype(np.int64) - 8, want), name
                assert f"{name}.codes" not in inits  # nothing left of the int8 form it replaced
                continue
            t = inits[f"{name}.codes_int4" if packed else f"{name}.codes"]
            assert t.data_type == (TensorProto.INT4 if packed else TensorProto.INT8)
            assert np.array_equal(numpy_helper.to_array(t).astype(np.int64), want), name
        assert not any(n.op_type == "QuantizeLinear" and n.input[0] in inits for n in model.graph.node)


def test_x86_avx2_target_keeps_summed_weights_on_7_bits_and_depthwise_on_8():
    class DW(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense, self.dw = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.dw(torch.relu(self.dense(x))).mean((2, 3)))

    qgm = _quantized(DW().eval(), 8, INT8.for_isa(ISA.X86_AVX2))
    codes = {n: m.hard_codes() for n, m in qgm.named_modules() if isinstance(m, QuantWeight)}
    for name in ("dense", "head"):  # u8 x s8 pairs stay within int16: |code| <= 64
        assert codes[name].min() >= -64 and codes[name].max() <= 63 and codes[name].abs().max() >= 60, name
    assert codes["dw"].abs().max() > 64  # a depthwise conv sums no channels: the full 8 bits


def _single_conv_exactness(target) -> float:
    """Max difference, in output steps, between ORT and the reference for one 64-channel conv fed 8-bit codes."""
    conv = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 8, 1))
    torch.manual_seed(0)
    calib = [seeded(8, 64, 8, 8, seed=i).abs() * 4 for i in range(2)]
    cfg = fxq.PTQConfig(target=target, progress=False)
    qgm = fxq.quantize(conv.eval(), calib, cfg).model
    onnx_model = fxq.backends.onnx.onnx_model(qgm, (calib[0][:1],))
    x = seeded(16, 64, 8, 8, seed=9).abs() * 4
    out = ort_session(onnx_model.SerializeToString()).run(None, {"input": x.numpy()})[0]
    return float(np.abs(out - qgm(x).detach().numpy()).max() / check_module.output_step(qgm))


def test_the_7_bit_form_is_exact_in_onnx_runtime_on_every_x86():
    assert _single_conv_exactness(INT8.for_isa(ISA.X86_AVX2)) <= 1 + 1e-3


@pytest.mark.skipif(fxq.targets.host_isa() is ISA.X86_AVX2, reason="8-bit weight grids saturate u8 x s8 pairs here")
def test_the_full_8_bit_form_is_exact_where_the_host_has_it():
    assert _single_conv_exactness(INT8.for_isa(fxq.targets.host_isa())) <= 1 + 1e-3


def test_onnx_runtime_fuses_int8_weights_into_integer_kernels(tiny_net, tmp_path):
    def fused_ops(storage, bits):
        path, opt = tmp_path / "tiny.onnx", tmp_path / "tiny_opt.onnx"
        export_onnx(_quantized(tiny_net, bits), (seeded(1, 3, 16, 16),), path, storage=storage)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(opt)
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(str(opt)).graph.node]

    for storage, bits in ((WeightStorage.PACKED, 8), (WeightStorage.INT8, 4)):
        ops = fused_ops(storage, bits)
        assert ops.count("QLinearConv") == 3 and "QLinearAdd" in ops and "Conv" not in ops
    # INT4 weights: ONNX Runtime's CPU dequantizes them and runs float convs (the gain is memory only); the linear
    # layer becomes MatMulNBits, which dequantizes its 4-bit blocks inside the matmul
    ops = fused_ops(WeightStorage.PACKED, 4)
    assert "QLinearConv" not in ops and ops.count("Conv") == 3 and ops.count("MatMulNBits") == 1


def test_packed_4_bit_weights_halve_the_file(tmp_path):
    net = WideNet().eval()
    sizes = {}
    for bits in (8, 4, 2):
        path = tmp_path / f"w{bits}.onnx"
        export_onnx(_quantized(net, bits), (seeded(1, 3, 16, 16),), path)
        sizes[bits] = path.stat().st_size
    weights = sum(p.numel() for p in net.parameters())
    assert sizes[8] >= weights  # a byte per weight, and a little more
    assert sizes[4] <= 0.6 * sizes[8] and sizes[2] <= 0.6 * sizes[8]


def test_metadata_names_the_target_the_widths_and_the_check(tiny_net, tmp_path):
    qgm = _quantized(tiny_net, 4, INT8.for_isa(ISA.X86_AVX2))
    path = tmp_path / "tiny.onnx"
    export_onnx(qgm, (seeded(1, 3, 16, 16),), path, check_inputs=seeded(8, 3, 16, 16, seed=2))
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["fxq.isa"] == "x86-avx2" and props["fxq.weight_storage"] == "packed"
    assert json.loads(props["fxq.weight_bits"]) == {"stem.0": 4, "conv_a": 4, "branch": 4, "head": 4}
    check = json.loads(props["fxq.check"])
    assert check["images"] == 8 and check["passed"] and check["backend"] == "onnxruntime"


def test_a_model_that_strays_from_its_reference_is_refused_and_nothing_is_written(tiny_net, tmp_path, monkeypatch):
    qgm = _quantized(tiny_net, 8)
    monkeypatch.setattr(QuantWeight, "hard_codes", lambda self: torch.zeros_like(self.layer.weight))  # wrong codes
    path = tmp_path / "bad.onnx"
    with pytest.raises(ExportMismatch, match=r"strays from the reference.*Nothing was written; pass --force"):
        export_onnx(qgm, (seeded(1, 3, 16, 16),), path, check_inputs=seeded(16, 3, 16, 16, seed=4))
    assert list(tmp_path.iterdir()) == []
    check = export_onnx(qgm, (seeded(1, 3, 16, 16),), path, force=True)
    assert path.is_file() and not check.passed and check.enforced


def test_a_host_that_cannot_compute_the_form_does_not_enforce_the_check(tiny_net, tmp_path, monkeypatch):
    qgm = _quantized(tiny_net, 8, INT8.for_isa(ISA.X86_VNNI))  # full 8-bit grids on every layer
    monkeypatch.setattr(check_module, "host_isa", lambda: ISA.X86_AVX2)
    limits = CheckLimits(max_output_steps=0.0, min_top1_agreement=1.0)  # would fail on any tie
    check = export_onnx(qgm, (seeded(1, 3, 16, 16),), tmp_path / "vnni.onnx", limits=limits)
    assert not check.enforced and "computes 8-bit weight grids inexactly" in check.note


def test_per_tensor_weights_are_refused_with_the_layer_name(tiny_net, tmp_path):
    target = fxq.Target("per-tensor", per_channel=False)
    qgm = fxq.quantize(tiny_net, [seeded(4, 3, 16, 16)], fxq.PTQConfig(target=target, progress=False)).model
    with pytest.raises(fxq.UnsupportedOp, match="per-tensor weight quantizer at 'stem.0'"):
        export_onnx(qgm, (seeded(1, 3, 16, 16),), tmp_path / "x.onnx")


def test_export_leaves_the_quantized_model_unchanged(tiny_net, tmp_path):
    qgm = _quantized(tiny_net)
    x = seeded(2, 3, 16, 16)
    before = qgm(x)
    export_onnx(qgm, (x[:1],), tmp_path / "t.onnx")
    torch.testing.assert_close(qgm(x), before, rtol=0, atol=0)
    assert "fxq" in qgm.meta and isinstance(qgm.get_submodule("stem.0"), nn.Module)
