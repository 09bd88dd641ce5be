import json
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

import fxq
from fxq import targets
from fxq.cli import main
from fxq.cli.options import rounding_schedule
from fxq.cli.parser import build_parser
from fxq.errors import ConfigError
from fxq.targets import host_isa
from tests.conftest import write_images


@pytest.fixture
def image_dirs(tmp_path):
    return write_images(tmp_path / "calib", 4, size=(72, 80), labels=False), write_images(
        tmp_path / "val", 6, size=(72, 72)
    )


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_quantize_then_eval_round_trip(tmp_path, image_dirs, capsys):
    calib, val = image_dirs
    out = tmp_path / "q"
    common = ["--model", "mobilenet_v3_small", "--random-weights", "--quiet"]
    code, stdout, _ = run(
        [
            "quantize",
            *common,
            "--calib",
            str(calib),
            "--val",
            str(val),
            "--weight-bits",
            "4",
            "--batch-size",
            "2",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0
    assert "W4A8" in stdout and "on 6 images" in stdout
    report = json.loads((out / "report.json").read_text())
    assert {lr["weight_bits"] for lr in report["layers"] if lr["weight_bits"]} == {4}
    assert report["calib_images"] == 4 and report["accuracy"]["quantized"]["images"] == 6
    assert report["preprocess"]["crop"] == 224
    code, stdout, _ = run(["eval", "--model", str(out), "--val", str(val), "--quiet"], capsys)
    assert code == 0
    saved_top1 = report["accuracy"]["quantized"]["top1"]
    assert f"top-1 {saved_top1:6.2f}" in stdout  # the reloaded model scores what the run reported
    saved = fxq.load(out)
    assert saved.preprocess.crop == 224 and not saved.model.training and saved.model_name == "mobilenet_v3_small"


@pytest.mark.parametrize(
    "args, message",
    [
        (["quantize", "--out", "x", "--weight-bits", "9"], r"weight_bits must be integers in \[2, 8\], got 9"),
        (["quantize", "--out", "x", "--act-bits", "1"], r"act_bits must be integers in \[2, 8\], got 1"),
        (["quantize", "--out", "x", "--model", "resnet1"], "unknown model 'resnet1'"),
        (["quantize", "--out", "x", "--model", "resnet18"], "give its weights with --weights FILE"),
        (["quantize", "--out", "x", "--calib", "/no/such/folder"], "image folder '/no/such/folder' does not exist"),
        (["eval", "--model", "/tmp"], "'/tmp' holds no model.json; give a folder written by fxq.save"),
        (["quantize", "--out", "x", "--method", "eptq", "--resume"], "resume needs checkpoint_dir"),
        (["quantize", "--out", "x", "--frozen-share", "1"], "1 is not a share: give a number from 0 up to"),
        (["bench", "--backends", "eager,tensorrt"], r"unknown backend\(s\) \['tensorrt'\] in --backends"),
        (["quantize", "--out", "x", "--device", "tpu9"], "unknown device 'tpu9'; give cpu, cuda, cuda:N or auto"),
        pytest.param(
            ["quantize", "--out", "x", "--device", "cuda"],
            "device 'cuda': no CUDA device is visible here; use cpu or auto",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible"),
        ),
    ],
)
def test_bad_input_gives_a_clear_error(args, message, capsys):
    import re

    code, _, err = run(args, capsys)
    assert code == 2
    assert err.startswith("fxq: error: ") and re.search(message, err)
    assert "Traceback" not in err


def test_lfh_command_writes_table_json_and_plot(tmp_path, image_dirs, capsys):
    calib, _ = image_dirs
    out = tmp_path / "lfh"
    code, stdout, _ = run(
        [
            "lfh",
            "--model",
            "mobilenet_v3_small",
            "--random-weights",
            "--calib",
            str(calib),
            "--batch-size",
            "2",
            "--min-probes",
            "2",
            "--max-probes",
            "2",
            "--out",
            str(out),
            "--quiet",
        ],
        capsys,
    )
    assert code == 0 and "interest tensors, 4 images" in stdout
    report = json.loads((out / "lfh.json").read_text())
    z = [lr for lr in report["layers"] if lr["interest"]]
    assert z and all(lr["lfh"] > 0 for lr in z) and min(lr["lfh_weight"] for lr in z) == 0.0
    assert (out / "lfh.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_onnx_and_pt2(tmp_path, image_dirs, capsys):
    import numpy as np
    import torch

    calib, _ = image_dirs
    out = tmp_path / "q"
    assert (
        main(
            [
                "quantize",
                "--model",
                "mobilenet_v3_small",
                "--random-weights",
                "--quiet",
                "--calib",
                str(calib),
                "--no-eval",
                "--batch-size",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    model = fxq.load(out).model
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
    assert main(["export", "--model", str(out), "--format", "pt2", "--out", str(tmp_path / "m.pt2")]) == 0
    ep = torch.export.load(str(tmp_path / "m.pt2"))
    torch.testing.assert_close(ep.module()(x), ref, rtol=1e-4, atol=1e-4)
    pytest.importorskip("onnxruntime")
    from fxq.backends.onnx import ort_session

    onnx_args = ["export", "--model", str(out), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]
    assert main([*onnx_args, "--calib", str(calib), "--quiet"]) == 0
    exported = json.loads((tmp_path / "m.onnx.json").read_text())
    assert exported["check"]["passed"] and exported["check"]["images"] == 4 and exported["isa"] == host_isa().value
    assert exported["file_bytes"] == (tmp_path / "m.onnx").stat().st_size and exported["weight_bytes"] > 0
    got = ort_session(str(tmp_path / "m.onnx")).run(None, {"input": x.numpy()})[0]
    ref = ref.numpy()
    # The output is quantized, so compare in output steps; top classes of a random-weight model often tie, so
    # ORT's top class must score within one step of the reference's best rather than share its index.
    step = np.diff(np.unique(ref)).min()
    assert np.isfinite(got).all()
    assert (np.abs(got - ref) <= 1.01 * step).mean() >= 0.99
    assert (ref[np.arange(len(ref)), got.argmax(1)] >= ref.max(1) - 1.01 * step).all()
    assert "onnxruntime vs reference on 4 inputs" in capsys.readouterr().out


def test_export_refuses_a_target_whose_kernels_cannot_compute_the_model(tmp_path, image_dirs, capsys):
    calib, _ = image_dirs
    out = tmp_path / "q"
    common = ["--model", "resnet18", "--random-weights", "--quiet", "--calib", str(calib), "--batch-size", "2"]
    assert main(["quantize", *common, "--no-eval", "--target", "generic", "--out", str(out)]) == 0
    args = ["export", "--model", str(out), "--out", str(tmp_path / "m.onnx"), "--calib", str(calib)]
    code, _, err = run([*args, "--target", "x86-avx2"], capsys)
    assert code == 2 and "8-bit weight grids" in err and "quantize it again with --target x86-avx2" in err
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.onnx.json").exists()


def test_bench_reports_every_backend_and_batch(tmp_path, image_dirs, capsys):
    pytest.importorskip("onnxruntime")
    calib, _ = image_dirs
    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "--model",
                "mobilenet_v3_small",
                "--random-weights",
                "--quiet",
                "--calib",
                str(calib),
                "--batch-size",
                "2",
                "--batch-sizes",
                "1,2",
                "--iters",
                "3",
                "--backends",
                "eager,onnx",  # inductor's compile takes a minute on CPU; its numerics are in test_compile_backend
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())["rows"]
    assert {(r["backend"], r["batch"]) for r in rows} == {
        (b, n) for b in ("eager fake-quant (reference)", "onnxruntime QDQ int8") for n in (1, 2)
    }
    for r in rows:
        assert r["float_ms"] > 0 and r["int8_ms"] > 0 and r["float_iqr_ms"] >= 0 and r["int8_iqr_ms"] >= 0
        assert r["int8_images_per_s"] == pytest.approx(1e3 * r["batch"] / r["int8_ms"])
        assert r["speedup"] == pytest.approx(r["float_ms"] / r["int8_ms"]) and r["repeats"] == 3
    out = capsys.readouterr().out
    assert "speed-up" in out and "img/s" in out and "threads" in out and "interquartile" in out


def test_bench_refuses_cpu_only_backends_on_a_gpu():
    from fxq.backends.latency import backend_latencies

    with pytest.raises(ConfigError, match=r"\['onnx'\] run on the CPU only.*--device cpu"):
        backend_latencies(nn.Linear(2, 2), None, 8, backends=("eager", "onnx"), device=torch.device("cuda"))


@pytest.mark.parametrize(
    ("budget", "start", "steps"), [(None, "float", 3), ("1h", "layerwise", 3), (None, "layerwise", 0)]
)
def test_eptq_quantize_reports_its_schedule(tmp_path, image_dirs, capsys, monkeypatch, budget, start, steps):
    calib, _ = image_dirs
    out = tmp_path / "eptq"
    args = ["quantize", "--model", "mobilenet_v3_small", "--random-weights", "--quiet", "--calib", str(calib)]
    args += ["--no-eval", "--weight-bits", "4", "--method", "eptq", "--schedule", "short", "--iterations", str(steps)]
    args += ["--rounding-batch", "2", "--lfh-probes", "1", "--batch-size", "2", "--out", str(out), "--start", start]
    # one case also trains the activation steps with QDrop, the others weigh positions and descend after the start
    act_steps = start == "float"
    args += (
        ["--train-act-steps", "--act-drop", "0.5"]
        if act_steps
        else ["--start-sensitivity", "0.5", "--start-sweeps", "2", "--prefix-steps", "2"]
    )

    class Crowded(targets.CpuClock):  # the budgeted run's host gives half the CPU time to other guests
        def read(self):
            return {**super().read(), "stolen_share": 0.5 if budget else 0.0}

    monkeypatch.setattr("fxq.cli.commands.CpuClock", Crowded)
    code, stdout, _ = run(args + (["--time-budget", budget] if budget else []), capsys)
    assert code == 0
    assert ("other guests of this virtual machine's host took 50% of its CPU time" in stdout) == bool(budget)
    length = f"up to {steps} iterations" if budget else f"{steps} iterations"
    assert f"EPTQ schedule: short (the CPU one; --schedule full for the paper's 20K x 32): {length}" in stdout
    says_start = "LFH up to 1 probes, from the layer-local start, the first layers (up to 1% of the weights) kept there"
    assert (says_start in stdout) == (start == "layerwise")
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "eptq" and report["rounding"]["iterations"] == steps
    assert report["rounding"]["start"] == start
    assert report["rounding"].get("start_sensitivity") == (0.5 if start == "layerwise" else None)
    assert report["rounding"].get("act_drop") == (0.5 if act_steps else 0.0)
    assert report["rounding"].get("start_sweeps") == (None if act_steps else 2)
    assert (
        report["rounding"].get("act_steps_trained", 0) > 0
        if act_steps
        else "act_steps_trained" not in report["rounding"]
    )
    # the first layers (under 1 % of the weights) stay at their start where steps follow it
    frozen = report["rounding"]["frozen_prefix"]
    assert (frozen is not None) == (start == "layerwise" and steps > 0)
    assert frozen is None or 0 < frozen["weight_share"] <= 0.01
    assert frozen is None or frozen["trained"]["iterations"] == 2  # --prefix-steps
    if budget:  # the loading counts against the budget; an hour leaves the 3 iterations asked for
        assert "planned to end within 3600 s" in stdout
        assert 3000 < report["settings"]["time_budget_s"] < 3600
        assert report["rounding"]["time_budget_s"] == report["settings"]["time_budget_s"]
        assert 0 < report["rounding"]["seconds_left_in_budget"] < report["settings"]["time_budget_s"]
    assert report["rounding"]["kept"] in ("eptq", "rtn")
    # with no whole-network steps nothing reads the LFH, so none is computed
    assert all((lr["lfh_weight"] is not None) == (steps > 0) for lr in report["layers"] if lr["interest"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_eptq_quantize_runs_on_the_gpu_with_the_full_schedule_by_default(tmp_path, image_dirs, capsys):
    calib, val = image_dirs
    out = tmp_path / "gpu"
    args = ["quantize", "--model", "mobilenet_v3_small", "--random-weights", "--quiet", "--calib", str(calib)]
    args += ["--val", str(val), "--weight-bits", "4", "--method", "eptq", "--iterations", "3", "--rounding-batch"]
    args += ["2", "--lfh-probes", "2", "--batch-size", "2", "--out", str(out)]
    code, stdout, _ = run(args, capsys)
    assert code == 0 and "EPTQ schedule: full: 3 iterations" in stdout  # auto: the GPU's schedule
    report = json.loads((out / "report.json").read_text())
    assert report["rounding"]["iterations"] == 3 and report["accuracy"]["quantized"]["images"] == 6
    code, stdout, _ = run(["eval", "--model", str(out), "--val", str(val), "--quiet", "--device", "cpu"], capsys)
    assert code == 0 and "on 6 images" in stdout  # the model saved from the GPU loads and runs on the CPU


@pytest.mark.parametrize("full", [False, True])
def test_the_main_job_runs_eptq_in_a_cpu_budget_unless_full(full):
    """`make main`'s command line is one fxq's parser takes, and plans EPTQ into 5 minutes from the layer-local
    start; FULL=1 runs the paper's schedule from the float weights, with no budget."""
    root = Path(__file__).resolve().parents[1]
    dry = subprocess.run(
        ["make", "-s", "-n", "-C", str(root), "main", *(["FULL=1"] if full else [])],
        text=True,
        capture_output=True,
        check=True,
    ).stdout
    line = next(x for x in dry.splitlines() if "fxq compare" in x)
    args = build_parser().parse_args(shlex.split(line)[1:])
    name, rounding, _ = rounding_schedule(args)
    assert args.runs == [("rtn", 8), ("rtn", 4), ("eptq", 4)]
    if full:
        assert (name, rounding.iterations, rounding.batch_size, rounding.start.value) == ("full", 20_000, 32, "float")
        assert args.time_budget is None
    else:
        assert (name, rounding.batch_size, rounding.start.value, args.time_budget) == ("short", 8, "layerwise", 300)


def test_compare_refuses_a_malformed_run(capsys):
    assert main(["compare", "--runs", "rtn:8,adaround:4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fxq: error:") and "bad run 'adaround:4'" in err


def test_pareto_writes_json_and_plot_with_mixed_and_uniform_points(tmp_path, image_dirs, capsys):
    calib, val = image_dirs
    out = tmp_path / "pareto"
    args = ["pareto", "--model", "mobilenet_v3_small", "--random-weights", "--quiet", "--calib", str(calib)]
    args += ["--val", str(val), "--batch-size", "2", "--mp-images", "2", "--avg-bits-list", "3,6"]
    args += ["--uniform", "2,8", "--out", str(out)]
    code, stdout, _ = run(args, capsys)
    assert code == 0 and "mixed  3.0 bits/weight" in stdout
    rows = json.loads((out / "pareto.json").read_text())["rows"]
    mixed = [r for r in rows if r["kind"] == "mixed"]
    uniform = {r["avg_bits"]: r for r in rows if r["kind"] == "uniform"}
    assert [r["budget_avg_bits"] for r in mixed] == [3.0, 6.0]
    assert all(r["avg_bits"] <= r["budget_avg_bits"] + 1e-9 for r in mixed)
    assert mixed[0]["weight_mb"] < mixed[1]["weight_mb"] <= uniform[8]["weight_mb"]
    assert uniform[2]["weight_mb"] == pytest.approx(uniform[8]["weight_mb"] / 4)
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_runs_rtn_and_eptq_side_by_side(tmp_path, image_dirs, capsys):
    calib, val = image_dirs
    args = ["compare", "--model", "mobilenet_v3_small", "--random-weights", "--quiet", "--calib", str(calib)]
    args += ["--val", str(val), "--batch-size", "2", "--runs", "rtn:4,eptq:4", "--iterations", "2"]
    args += ["--rounding-batch", "2", "--lfh-probes", "1", "--out", str(tmp_path / "compare")]
    code, stdout, _ = run(args, capsys)
    assert code == 0 and "EPTQ schedule: short" in stdout
    assert "W4A8 rtn" in stdout and "W4A8 eptq" in stdout
    results = json.loads((tmp_path / "compare" / "compare.json").read_text())["results"]
    assert set(results) == {"float", "W4A8 rtn", "W4A8 eptq"}
    assert results["W4A8 eptq"]["images"] == 6


def test_quantize_with_activation_widths_in_the_ilp(tmp_path, image_dirs, capsys):
    calib, _ = image_dirs
    out = tmp_path / "mixed"
    args = ["quantize", "--model", "mobilenet_v3_small", "--random-weights", "--quiet", "--calib", str(calib)]
    args += ["--no-eval", "--batch-size", "2", "--mp-images", "2", "--avg-bits", "6", "--act-bit-options", "4,8"]
    args += ["--act-avg-bits", "6", "--out", str(out)]
    code, stdout, _ = run(args, capsys)
    assert code == 0 and "bits/value" in stdout
    mixed = json.loads((out / "report.json").read_text())["mixed_precision"]
    assert set(mixed["act_bits"].values()) == {4, 8} and mixed["act_avg_bits"] <= 6 + 1e-9
    assert mixed["avg_bits"] <= 6 + 1e-9


def test_quantize_with_output_error_weight_thresholds(tmp_path, image_dirs, capsys):
    calib, _ = image_dirs
    reports = {}
    for error in ("mse", "output"):
        out = tmp_path / error
        args = ["quantize", "--model", "mobilenet_v3_small", "--random-weights", "--quiet", "--calib", str(calib)]
        args += ["--no-eval", "--batch-size", "2", "--weight-bits", "4", "--weight-error", error, "--out", str(out)]
        assert run(args, capsys)[0] == 0
        reports[error] = json.loads((out / "report.json").read_text())
        assert reports[error]["settings"]["weight_error"] == error
    thresholds = [{lr["node"]: lr["w_threshold"] for lr in r["layers"] if lr["w_threshold"]} for r in reports.values()]
    assert thresholds[0].keys() == thresholds[1].keys() and thresholds[0] != thresholds[1]


def test_quantize_selects_among_sensitivity_measures(tmp_path, image_dirs, capsys):
    calib, _ = image_dirs
    out = tmp_path / "selected"
    args = ["quantize", "--model", "mobilenet_v3_small", "--random-weights", "--quiet", "--calib", str(calib)]
    args += ["--no-eval", "--batch-size", "2", "--mp-images", "2", "--avg-bits", "4", "--mp-loss-weights"]
    args += ["output,mean", "--mp-check-images", "2", "--out", str(out)]
    code, stdout, _ = run(args, capsys)
    assert code == 0 and "kept (agreement with float on 2 calib images" in stdout
    mixed = json.loads((out / "report.json").read_text())["mixed_precision"]
    assert set(mixed["agreement"]) == {"output", "mean"} and mixed["selected"] in mixed["agreement"]
    assert mixed["bits"] == mixed["candidates"][mixed["selected"]]["bits"]
    assert main(["quantize", "--out", "x", "--avg-bits", "4", "--mp-loss-weights", "lfh,hessian"]) == 2
    assert "unknown measure(s) ['hessian']" in capsys.readouterr().err
