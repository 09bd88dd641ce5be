"""The per-op timer: every quantized op found with its real shapes, MACs by the formula, a report that matches its
schema, and the CLI's per-op outputs."""

import copy
import json

import pytest

import fxq
from fxq.backends.peaks import Peaks
from fxq.backends.per_op import PER_OP_SCHEMA, per_op_report, quantized_ops, time_ops, to_rows
from fxq.cli import main
from fxq.ir.meta import gq
from fxq.quant.modules import QuantWeight
from tests.conftest import TinyNet, randomize_bn_, seeded

jsonschema = pytest.importorskip("jsonschema")
PEAKS = Peaks(50.0, 100.0, "test", 10.0, 1024, 256, 2)


@pytest.fixture(scope="module")
def tiny():
    model = randomize_bn_(TinyNet()).eval()
    x = seeded(4, 3, 16, 16)
    qgm, _ = fxq.quantize(model, [x], fxq.PTQConfig(progress=False))
    return qgm, x


def test_finds_every_quantized_op_with_its_real_input(tiny):
    qgm, x = tiny
    cases = quantized_ops(qgm, x)
    modules = dict(qgm.named_modules())
    expected = [
        n.target for n in qgm.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], QuantWeight)
    ]
    assert [c.node for c in cases] == expected and len(cases) == 4
    by = {c.node: c for c in cases}
    head = next(c for c in cases if c.kind == "linear")
    assert head.x.shape == (4, 12) and head.macs == 4 * 5 * 12
    stem = cases[0]
    assert stem.kind == "conv" and stem.x.shape == (4, 3, 16, 16) and stem.out_shape == (4, 8, 16, 16)
    assert stem.macs == 4 * 8 * 16 * 16 * 3 * 3 * 3
    for c in by.values():
        assert tuple(c.quant(c.x).shape) == c.out_shape
        assert c.weight_bits == 8 and c.act_bits == 8
        assert c.traffic(True) < c.traffic(False)


def test_report_matches_its_schema_and_the_schema_can_fail(tiny):
    qgm, x = tiny
    rows = time_ops(quantized_ops(qgm, x), ("reference",), PEAKS, gq(qgm).target, iters=2, progress=False)
    report = json.loads(json.dumps(per_op_report("tiny", qgm, rows, PEAKS, 4)))
    jsonschema.validate(report, PER_OP_SCHEMA)
    op = report["ops"][0]
    assert set(op["ms"]) == {"reference:float", "reference:quantized"} and all(v > 0 for v in op["ms"].values())
    assert op["gops"]["reference:float"] == pytest.approx(2 * op["macs"] / (op["ms"]["reference:float"] * 1e-3) / 1e9)
    intensity = 2 * op["macs"] / op["bytes_float"]
    roof = min(PEAKS.fp32_gflops, PEAKS.bandwidth_gbs * intensity)
    assert op["peak_fraction"]["reference:float"] == pytest.approx(op["gops"]["reference:float"] / roof)
    assert len(to_rows(report)) == 2 * len(report["ops"])
    for broken in ({**report, "schema": "other/2"}, {**report, "ops": [{**op, "kind": "pool"}]}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, PER_OP_SCHEMA)
    extra = copy.deepcopy(report)
    extra["ops"][0]["ms"]["reference"] = 1.0  # a runner key without its side
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(extra, PER_OP_SCHEMA)


def test_onnx_per_op_runs_each_op_through_integer_kernels(tiny):
    pytest.importorskip("onnxruntime")
    qgm, x = tiny
    rows = time_ops(quantized_ops(qgm, x)[:2], ("onnx",), PEAKS, gq(qgm).target, iters=2, progress=False)
    assert all(set(r.ms) == {"onnx:float", "onnx:quantized"} for r in rows)


def test_cli_writes_per_op_json_csv_and_roofline(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from tests.conftest import write_images

    calib = write_images(tmp_path / "calib", 2, size=(32, 32), labels=False)
    out = tmp_path / "perop"
    args = ["bench", "--model", "cifar10_resnet20", "--random-weights", "--quiet", "--calib", str(calib)]
    args += ["--batch-sizes", "1", "--iters", "1", "--backends", "eager", "--per-op", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "roofs: fp32 GEMM" in printed and "layer3.2.conv2" in printed
    assert sorted(p.name for p in out.iterdir()) == ["per_op_b1.csv", "per_op_b1.json", "roofline_b1.png"]
    report = json.loads((out / "per_op_b1.json").read_text())
    jsonschema.validate(report, PER_OP_SCHEMA)
    assert len(report["ops"]) == 20  # 19 convs and the classifier of ResNet-20
    assert (out / "roofline_b1.png").stat().st_size > 10_000
    assert main(args) == 2 and "--force" in capsys.readouterr().err  # an existing folder is not overwritten


def test_bench_takes_a_saved_folder(tmp_path, capsys):
    from tests.conftest import write_images

    calib = write_images(tmp_path / "calib", 2, size=(32, 32), labels=False)
    common = ["--random-weights", "--quiet", "--calib", str(calib)]
    saved = tmp_path / "q"
    assert main(["quantize", "--model", "cifar10_resnet20", *common, "--no-eval", "--out", str(saved)]) == 0
    capsys.readouterr()
    args = ["bench", "--model", str(saved), *common, "--batch-sizes", "1", "--iters", "1", "--backends", "eager"]
    assert main([*args, "--per-op", str(tmp_path / "perop")]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"{saved} (cifar10_resnet20)" in printed and "layer3.2.conv2" in printed
    assert len(json.loads((tmp_path / "perop" / "per_op_b1.json").read_text())["ops"]) == 20
