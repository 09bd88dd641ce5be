"""fxq against the tools a user would pick instead, on the same float model and calibration images.

    python bench/peers.py [--model efficientnet_lite0] [--num-calib 1000] [--rows all] [--iters 20] [--json FILE]

Rows: ONNX Runtime's own static quantization (quantize_static, QDQ, per-channel weights, MinMax calibration) with
and without reduce_range; torchao's PT2E flow (prepare_pt2e / convert_pt2e with X86InductorQuantizer, then
torch.compile with freezing); fxq W8A8 and W4A8, RTN and EPTQ (the short CPU schedule), each exported to ONNX
Runtime and lowered to Inductor int8. Each row: top-1 on the val images, quantization wall time,
batch-1 and batch-32 latency (median of --iters), all timed in this run beside fp32 ONNX Runtime and fp32 Inductor;
for Inductor rows, how many of the convolutions and matmuls one call runs as integer kernels (torch.profiler).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from functools import partial

import numpy as np
import torch

import fxq
from fxq.backends.inductor import FrozenCompiled, compile_int8, int8_inductor_available
from fxq.backends.latency import time_call
from fxq.backends.onnx import export_float_onnx, export_onnx, ort_session
from fxq.config import Method, RoundingConfig
from fxq.data.images import batches, load_images
from fxq.data.models import default_image_sets, load_model
from fxq.targets import INT8, cpu_description

ROWS = ("ort", "ort-reduce-range", "pt2e", "pt2e-padfold", "fxq-w8", "fxq-w8-eptq", "fxq-w4", "fxq-w4-eptq")
# the ops that run a convolution or matmul in a compiled graph, integer and float (torch.profiler names)
_INT_KERNELS = ("onednn::qconv_pointwise", "onednn::qconv2d_pointwise", "onednn::qlinear_pointwise")
_FLOAT_KERNELS = (
    "mkldnn::_convolution_pointwise",
    "aten::convolution",
    "aten::addmm",
    "aten::mm",
    "mkldnn::_linear_pointwise",
)


def _logits(run, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([torch.as_tensor(np.asarray(run(b))) for b in x.split(50)])


def _ort_runner(path: str):
    session = ort_session(path)
    return lambda x: session.run(None, {"input": x.numpy()})[0]


def _ort_static(float_path: str, out: str, calib: torch.Tensor, reduce_range: bool) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calib.split(32))

        def get_next(self):
            b = next(self.batches, None)
            return None if b is None else {"input": b.numpy()}

    pre = out + ".pre.onnx"
    quant_pre_process(float_path, pre)
    quantize_static(
        pre,
        out,
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=reduce_range,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )


def integer_kernels(run, x: torch.Tensor) -> str:
    """'integer of all' convolution/matmul kernels one call of a compiled model runs (from torch.profiler)."""
    with torch.no_grad(), torch.profiler.profile() as prof:
        run(x)
    names = [e.name for e in prof.events()]
    ints = sum(names.count(k) for k in _INT_KERNELS)
    return f"{ints}/{ints + sum(names.count(k) for k in _FLOAT_KERNELS)}"


def _fold_symmetric_padding(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose convolutions that pad with a separate ZeroPad2d (EfficientNet-Lite's TF-style 'same'
    padding) pad inside the convolution instead, wherever the padding is symmetric (the same logits). PT2E's x86
    quantizer does not quantize through a pad, so without this every such convolution keeps float inputs."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, m in list(parent.named_children()):
            pad = getattr(m, "static_padding", None)
            if not isinstance(m, torch.nn.Conv2d) or pad is None:
                continue
            left, right, top, bottom = pad.padding if isinstance(pad, torch.nn.ZeroPad2d) else (0, 0, 0, 0)
            if left != right or top != bottom:
                continue  # asymmetric (the stride-2 ones): a convolution cannot pad so; kept as it is
            conv = torch.nn.Conv2d(
                m.in_channels,
                m.out_channels,
                m.kernel_size,
                m.stride,
                (top, left),
                m.dilation,
                m.groups,
                m.bias is not None,
            )
            conv.load_state_dict(m.state_dict())
            setattr(parent, name, conv)
    return model


def _pt2e(model: torch.nn.Module, calib: torch.Tensor):
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    example = (calib[:2],)
    exported = torch.export.export(model, example, dynamic_shapes=({0: torch.export.Dim.AUTO},)).module()
    for n in exported.graph.nodes:  # one partition per call: Lite0 calls a block's ReLU6 module twice, and the
        # quantizer refuses a partition with two outputs once the convolutions' inputs are quantized
        stack = n.meta.get("nn_module_stack")
        if stack:
            key, (path, cls) = list(stack.items())[-1]
            stack[key] = (f"{path}@{n.name}", cls)
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for b in calib.split(32):
            prepared(b)
    converted = convert_pt2e(prepared)
    return FrozenCompiled(converted)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--num-calib", type=int, default=1000)
    p.add_argument("--rows", default="all", help=f"comma-separated from {','.join(ROWS)}")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", default=None)
    p.add_argument("--eptq-iterations", type=int, default=None, help="EPTQ rows: steps of 8 (default: the short 400)")
    p.add_argument("--eptq-start", default="float", choices=("float", "layerwise"), help="EPTQ rows: where V starts")
    args = p.parse_args()
    fxq.keep_freed_memory()  # as the command line does (fxq.memory)
    rows = ROWS if args.rows == "all" else tuple(args.rows.split(","))
    steps = {
        "start": args.eptq_start,
        **({"iterations": args.eptq_iterations} if args.eptq_iterations is not None else {}),
    }
    lm = load_model(args.model)
    calib_dir, val_dir = default_image_sets(args.model)
    calib = load_images(calib_dir, lm.preprocess, args.num_calib, progress=False)
    val = load_images(val_dir, lm.preprocess, labeled=True, progress=False)
    x1, x32 = val.x[:1], val.x[:32]

    def top1(run) -> float:
        return 100 * float((_logits(run, val.x).argmax(1) == val.y).float().mean())

    def latency(run) -> tuple[float, float]:
        with torch.no_grad():
            return 1e3 * time_call(partial(run, x1), args.iters), 1e3 * time_call(partial(run, x32), args.iters)

    out = []

    def report(name: str, backend: str, run, seconds: float | None) -> None:
        b1, b32 = latency(run)
        kernels = integer_kernels(run, x1) if backend.startswith("inductor") else "-"
        row = {"row": name, "backend": backend, "top1": top1(run), "quantize_s": seconds, "b1_ms": b1, "b32_ms": b32}
        out.append({**row, "integer_kernels": kernels})
        q = f"{seconds:9.1f}" if seconds is not None else " " * 9
        print(f"{name:<18} {backend:<16} {row['top1']:6.2f} {q} {b1:9.2f} {b32:9.2f} {kernels:>9}", flush=True)

    print(f"{args.model}: {len(calib)} calibration, {len(val)} val images; CPU {cpu_description()}, ")
    print(f"{torch.get_num_threads()} threads; latency: median of {args.iters}")
    print(f"{'row':<18} {'backend':<16} {'top-1':>6} {'quant. s':>9} {'b1 ms':>9} {'b32 ms':>9} {'int ops':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        float_path = os.path.join(tmp, "float.onnx")
        export_float_onnx(lm.model, (calib.x[:2],), float_path)
        report("float", "onnxruntime", _ort_runner(float_path), None)
        if int8_inductor_available():
            report("float", "inductor", FrozenCompiled(lm.model), None)
        for name in rows:
            t0 = time.perf_counter()
            if name.startswith("ort"):
                path = os.path.join(tmp, f"{name}.onnx")
                _ort_static(float_path, path, calib.x, reduce_range=name == "ort-reduce-range")
                report(name, "onnxruntime", _ort_runner(path), time.perf_counter() - t0)
            elif name.startswith("pt2e"):
                model = _fold_symmetric_padding(lm.model) if name == "pt2e-padfold" else lm.model
                compiled = _pt2e(model, calib.x)
                compiled(x1)  # compiles
                report(name, "inductor int8", compiled, time.perf_counter() - t0)
            else:
                bits = 8 if name.startswith("fxq-w8") else 4
                method = Method.EPTQ if name.endswith("eptq") else Method.RTN
                cfg = fxq.PTQConfig(
                    target=INT8.with_bits(bits), method=method, rounding=RoundingConfig.short(**steps), progress=False
                )
                qgm, _ = fxq.quantize(lm.model, batches(calib.x, 32), cfg)
                seconds = time.perf_counter() - t0
                report(name, "reference", qgm, seconds)
                path = os.path.join(tmp, f"{name}.onnx")
                export_onnx(qgm, (calib.x[:2],), path, check_inputs=calib.x[:64])
                report(name, "onnxruntime", _ort_runner(path), seconds)
                if int8_inductor_available():
                    torch._dynamo.reset()
                    report(name, "inductor int8", compile_int8(qgm), seconds)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"model": args.model, "cpu": cpu_description(), "rows": out}, fh, indent=2)


if __name__ == "__main__":
    main()
