"""The PT2E Q/DQ form of an fxq graph and its lowering to integer kernels with Inductor (fxq.backends.inductor)."""

import dataclasses

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import fxq
from fxq.backends.inductor import DequantWeight, QDQActivation, compile_int8, int8_inductor_available, to_qdq_form
from fxq.eptq.soft_rounding import SoftRounding
from fxq.errors import ConfigError, UnsupportedOp
from fxq.frontend.dynamo import backend
from fxq.quant.modules import QuantWeight
from tests.conftest import seeded

needs_int8_inductor = pytest.mark.skipif(
    not int8_inductor_available(), reason="torchao's x86 Inductor passes or oneDNN not available"
)


class PoolNet(nn.Module):
    """conv -> relu -> maxpool -> conv, and flatten -> linear: weighted layers fed through value-moving ops."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        y = self.pool(torch.relu(self.conv1(x)))
        y = torch.relu(self.conv2(y))
        return self.fc(torch.flatten(self.pool(y), 1))


def _calib(shape=(8, 3, 16, 16)):
    return [seeded(*shape, seed=i) for i in range(2)]


def _quantized(model, weight_bits=8, **kw):
    torch.manual_seed(0)
    cfg = fxq.PTQConfig(target=fxq.INT8.with_bits(weight_bits), progress=False, **kw)
    return fxq.quantize(model.eval(), _calib(), cfg).model


def _output_step(qgm) -> float:
    last = [m for m in qgm.modules() if isinstance(m, fxq.quant.modules.ActQuant)][-1]
    return float(last.scale)


@pytest.mark.parametrize("weight_bits", [8, 4])
def test_form_holds_integer_codes_on_the_quantizers_grids(tiny_net, weight_bits):
    qgm = _quantized(tiny_net, weight_bits)
    form = to_qdq_form(qgm)
    weights = {n: m for n, m in form.named_modules() if isinstance(m, DequantWeight)}
    assert len(weights) == sum(isinstance(m, QuantWeight) for m in qgm.modules()) == 4
    lo, hi = -(2 ** (weight_bits - 1)), 2 ** (weight_bits - 1) - 1
    for name, dw in weights.items():
        assert dw.codes.dtype == torch.int8 and lo <= int(dw.codes.min()) and int(dw.codes.max()) <= hi
        ref = qgm.get_submodule(name).quantized_weight()
        torch.testing.assert_close(dw.codes.float() * dw.scale.view(-1, 1, *([1] * (ref.dim() - 2))), ref)
    acts = [m for m in form.modules() if isinstance(m, QDQActivation)]
    assert acts and {a.zero_point for a in acts} <= {0, 128} and all(a.quant_max == 255 for a in acts)


def test_form_computes_the_reference_numbers(tiny_net):
    qgm = _quantized(tiny_net)
    x = seeded(16, 3, 16, 16, seed=7)
    with torch.no_grad():
        ref, out = qgm(x), to_qdq_form(qgm)(x)
    # quantize_per_tensor multiplies by 1/s where fxq divides by s: a tie may round the other way
    assert (out - ref).abs().max() <= _output_step(qgm) + 1e-6
    assert (out - ref).abs().gt(1e-6).float().mean() < 0.05


def test_weighted_layers_behind_value_moving_ops_get_their_grid_back():
    qgm = _quantized(PoolNet())
    form = to_qdq_form(qgm)
    inputs = {n.target: n.args[0] for n in form.graph.nodes if n.op == "call_module" and n.target in ("conv2", "fc")}
    for target, x in inputs.items():  # maxpool and flatten sit between their quantizer and the layer
        assert x.op == "call_module" and isinstance(form.get_submodule(x.target), QDQActivation), target
    x = seeded(4, 3, 16, 16, seed=3)
    with torch.no_grad():
        assert (form(x) - qgm(x)).abs().max() <= _output_step(qgm) + 1e-6


def test_form_refuses_what_it_cannot_express(tiny_net):
    per_tensor = fxq.INT8.with_bits(8)
    per_tensor = dataclasses.replace(per_tensor, per_channel=False)
    qgm = fxq.quantize(tiny_net, _calib(), fxq.PTQConfig(target=per_tensor, progress=False)).model
    with pytest.raises(UnsupportedOp, match="per-tensor weight"):
        to_qdq_form(qgm)
    qgm = _quantized(tiny_net)
    SoftRounding([next(m for m in qgm.modules() if isinstance(m, QuantWeight))])
    with pytest.raises(ConfigError, match="harden"):
        to_qdq_form(qgm)


@needs_int8_inductor
def test_compile_int8_runs_integer_kernels_with_reference_numbers():
    qgm = _quantized(PoolNet())
    torch._dynamo.reset()
    counters.clear()
    run = compile_int8(qgm)
    x = seeded(4, 3, 16, 16, seed=5)
    with torch.no_grad():
        out, ref = run(x), qgm(x)
    assert counters["inductor"]["qconv_weight_prepack_matcher_count"] == 2  # both convs became oneDNN int8
    assert counters["inductor"]["qlinear_weight_prepack_matcher_count"] == 1
    assert (out - ref).abs().max() <= 2 * _output_step(qgm) + 1e-6
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.75


@needs_int8_inductor
def test_compile_backend_int8_matches_the_api(tiny_net):
    ref = _quantized(tiny_net)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(
        tiny_net, backend=backend(_calib(), fxq.PTQConfig(progress=False), int8=True), dynamic=False
    )
    x = seeded(4, 3, 16, 16, seed=9)
    with torch.no_grad():
        out, r = compiled(x), ref(x)
    assert counters["inductor"]["qconv_weight_prepack_matcher_count"] >= 1
    assert (out - r).abs().max() <= 2 * _output_step(ref) + 1e-6


@needs_int8_inductor
def test_aot_package_runs_without_fxq_at_any_batch(tmp_path):
    qgm = _quantized(PoolNet())
    path = tmp_path / "pool.pt2"
    fxq.package_int8(qgm, (seeded(1, 3, 16, 16),), path)
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically
    run = torch._inductor.aoti_load_package(str(path))
    for batch in (1, 5):
        x = seeded(batch, 3, 16, 16, seed=batch)
        with torch.no_grad():
            out, ref = run(x), qgm(x)
        assert out.shape == ref.shape
        assert (out - ref).abs().max() <= 2 * _output_step(qgm) + 1e-6


_AVX2_SCRIPT = """
import torch
import fxq
from fxq.targets import ISA, host_isa
from tests.test_qdq_form import PoolNet, _quantized, _output_step
from tests.conftest import seeded
assert host_isa() is ISA.X86_AVX2, host_isa()
qgm = _quantized(PoolNet())
run = fxq.compile_int8(qgm)
x = seeded(16, 3, 16, 16, seed=5)
with torch.no_grad():
    print(float((run(x) - qgm(x)).abs().max() / _output_step(qgm)))
"""


@needs_int8_inductor
def test_onednn_capped_at_avx2_computes_the_host_form_exactly():
    """ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN run the saturating u8 x s8 kernels of CPUs without VNNI (on a VNNI
    machine too): fxq reads the cap as the host's ISA, quantizes for it, and the integer kernels agree."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", _AVX2_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) <= 2 + 1e-4
