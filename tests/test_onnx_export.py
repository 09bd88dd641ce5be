import numpy as np
import pytest
import torch
from torch import nn

import fxq
from fxq.targets import INT8
from tests.conftest import seeded

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from fxq.latency import ort_session  # noqa: E402
from fxq.onnx_export import export_onnx  # noqa: E402


def _quantized(tiny_net, bits=8):
    return fxq.quantize(
        tiny_net,
        [seeded(8, 3, 16, 16, seed=i) for i in range(2)],
        fxq.PTQConfig(target=INT8.with_bits(bits), progress=False),
    ).model


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_onnx_runtime_matches_the_reference(tiny_net, tmp_path, bits):
    qgm = _quantized(tiny_net, bits)
    path = tmp_path / "tiny.onnx"
    export_onnx(qgm, (seeded(1, 3, 16, 16),), path)
    x = seeded(6, 3, 16, 16, seed=7)  # another batch size: the batch dimension is dynamic
    out = ort_session(str(path)).run(None, {"input": x.numpy()})[0]
    ref = qgm(x).detach().numpy()
    step = float(qgm.get_submodule("fxq_act_head").scale)  # the output quantizer's step
    # integer kernels round intermediate requantizations differently: allow a few output steps
    assert np.abs(out - ref).max() <= 4 * step
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 5 / 6


def test_the_qdq_graph_run_in_float_is_the_reference(tiny_net, tmp_path):
    """With ORT's graph rewrites off, the QDQ graph runs in float exactly as fxq's reference does: int32 biases
    that dequantize to the reference's own biases, the same quantizers. Only rounding ties may differ."""
    from onnx import numpy_helper

    qgm = _quantized(tiny_net)
    path = tmp_path / "tiny.onnx"
    export_onnx(qgm, (seeded(1, 3, 16, 16),), path)
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    for name, ints in ((n, a) for n, a in inits.items() if n.endswith(".bias_int32")):
        bias = qgm.get_parameter(name[: -len("_int32")]).detach().numpy()
        assert np.array_equal(ints.astype(np.float32) * inits[name.replace("_int32", "_scale")], bias), name
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = seeded(64, 3, 16, 16, seed=3)
    out, ref = sess.run(None, {"input": x.numpy()})[0], qgm(x).detach().numpy()
    step = float(qgm.get_submodule("fxq_act_head").scale)
    assert np.abs(out - ref).max() <= step * 1.001 and (out == ref).mean() > 0.95


def test_weights_ship_as_integers_on_their_grid(tiny_net, tmp_path):
    qgm = _quantized(tiny_net, 4)
    path = tmp_path / "tiny.onnx"
    export_onnx(qgm, (seeded(1, 3, 16, 16),), path)
    model = onnx.load(str(path))
    from onnx import numpy_helper

    weights = [numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith(".w_quantized")]
    assert len(weights) == 4  # stem, conv_a, branch, head
    for w in weights:
        assert w.dtype == np.int8 and w.min() >= -8 and w.max() <= 7  # 4-bit grid held in int8
    biases = [t for t in model.graph.initializer if t.name.endswith("_int32")]
    assert len(biases) == 4
    inits = {t.name for t in model.graph.initializer}
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in inits for n in model.graph.node)  # all folded


def test_onnx_runtime_fuses_into_integer_kernels(tiny_net, tmp_path):
    path, opt = tmp_path / "tiny.onnx", tmp_path / "tiny_opt.onnx"
    export_onnx(_quantized(tiny_net), (seeded(1, 3, 16, 16),), path)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(opt)
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(opt)).graph.node]
    assert ops.count("QLinearConv") == 3 and "QLinearAdd" in ops and "Conv" not in ops


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
