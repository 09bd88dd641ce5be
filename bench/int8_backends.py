"""Integer backends against the reference on real images, per integer form: top-1, agreement, file sizes.

    python bench/int8_backends.py [--model efficientnet_lite0] [--runs w8,w4,mp4] [--forms host,generic]
        [--num-calib 1000] [--json FILE]

For each run (RTN W8A8, RTN W4A8, mixed precision at 4 bits/weight) and each integer form (`host`: the one
fxq picks for this CPU; any ISA name to quantize for another, e.g. `generic`, the full 8-bit grids), the
reference fake-quant model, its ONNX Runtime export and its Inductor int8 lowering score the val images; the
table gives each one's top-1 and the share of images whose top-1 class is the reference's, and the ONNX file's
size. The CPU and its ISA class head the table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from functools import partial

import torch

import fxq
from fxq.backends.check import CheckLimits
from fxq.backends.inductor import compile_int8, int8_inductor_available
from fxq.backends.onnx import export_onnx, ort_session
from fxq.config import MixedPrecisionConfig
from fxq.data.images import batches, load_images
from fxq.data.models import default_image_sets, load_model
from fxq.targets import INT8, cpu_description

RUNS = {
    "w8": (8, None),
    "w4": (4, None),
    "mp4": (8, MixedPrecisionConfig(avg_bits=4.0)),
}


def _run_onnx(session, x: torch.Tensor):
    return session.run(None, {"input": x.numpy()})[0]


def _logits(run, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([torch.as_tensor(run(b)) for b in x.split(50)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--runs", default="w8,w4,mp4")
    p.add_argument("--forms", default="host,generic")
    p.add_argument("--num-calib", type=int, default=1000)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    lm = load_model(args.model)
    calib_dir, val_dir = default_image_sets(args.model)
    calib = load_images(calib_dir, lm.preprocess, args.num_calib, progress=False)
    val = load_images(val_dir, lm.preprocess, labeled=True, progress=False)
    float_top1 = 100 * float((_logits(lm.model, val.x).argmax(1) == val.y).float().mean())
    print(f"{args.model}: {len(calib)} calibration, {len(val)} val images; CPU {cpu_description()}")
    print(f"float top-1 {float_top1:.2f}")
    print(
        f"{'run':<5} {'form':<9} {'backend':<14} {'top-1':>6} {'same top-1':>10} {'within a step':>13} "
        f"{'max steps':>9} {'file MB':>8}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run_name in args.runs.split(","):
            bits, mp = RUNS[run_name]
            for form in args.forms.split(","):
                cfg = fxq.PTQConfig(target=INT8.with_bits(bits).for_isa(form), mixed_precision=mp, progress=False)
                qgm, _ = fxq.quantize(lm.model, batches(calib.x, 32), cfg)
                ref = _logits(qgm, val.x)
                backends = {"reference": ref}
                path = os.path.join(tmp, f"{run_name}_{form}.onnx")
                # force: the generic form is expected to fail the check on a CPU without VNNI; that is the point
                export_onnx(qgm, (calib.x[:2],), path, check_inputs=calib.x, limits=CheckLimits(), force=True)
                backends["onnxruntime"] = _logits(partial(_run_onnx, ort_session(path)), val.x)
                if int8_inductor_available():
                    torch._dynamo.reset()
                    backends["inductor-int8"] = _logits(compile_int8(qgm), val.x)
                for name, logits in backends.items():
                    step = fxq.backends.check.output_step(qgm)
                    picked = logits.argmax(1, keepdim=True)
                    deficit = (ref.max(1).values - ref.gather(1, picked)[:, 0]) / step
                    row = {
                        "run": run_name,
                        "form": cfg.target.isa.value,
                        "backend": name,
                        "top1": 100 * float((logits.argmax(1) == val.y).float().mean()),
                        "agreement": 100 * float((logits.argmax(1) == ref.argmax(1)).float().mean()),
                        "agreement_within_a_step": 100 * float((deficit <= 1 + 1e-4).float().mean()),
                        "max_abs_steps": float((logits - ref).abs().max() / step),
                        "mean_abs_steps": float((logits - ref).abs().mean() / step),
                        "file_mb": os.path.getsize(path) / 1e6 if name == "onnxruntime" else None,
                    }
                    rows.append(row)
                    mb = f"{row['file_mb']:8.3f}" if row["file_mb"] else ""
                    print(
                        f"{run_name:<5} {row['form']:<9} {name:<14} {row['top1']:6.2f} {row['agreement']:9.2f}% "
                        f"{row['agreement_within_a_step']:12.2f}% {row['max_abs_steps']:9.1f} {mb}",
                        flush=True,
                    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"model": args.model, "cpu": cpu_description(), "float_top1": float_top1, "rows": rows}, fh, indent=2
            )


if __name__ == "__main__":
    main()
