"""ONNX Runtime (QDQ int8) against fxq's reference fake-quant model on the labeled val images.

    python bench/onnx_numerics.py [--model efficientnet_lite0] [--weight-bits 8] [--num-calib 1000] [--json FILE]

Reports the max abs logit difference, the share of images whose top-1 class agrees, and both accuracies.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

import fxq
from fxq.data import batches, default_data_dir, load_images
from fxq.latency import ort_session
from fxq.models import load_model
from fxq.onnx_export import export_onnx


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--weight-bits", type=int, default=8)
    p.add_argument("--num-calib", type=int, default=1000)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    data = default_data_dir() / "imagenet"
    lm = load_model(args.model)
    calib = load_images(data / "calib", lm.preprocess, args.num_calib, progress=False)
    val = load_images(data / "val", lm.preprocess, labeled=True, progress=False)
    cfg = fxq.PTQConfig(target=fxq.INT8.with_bits(args.weight_bits), progress=False)
    qgm, _ = fxq.quantize(lm.model, batches(calib.x, 32), cfg)
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/q.onnx"
        export_onnx(qgm, (val.x[:2],), path)
        sess = ort_session(path)
        with torch.no_grad():
            ref = torch.cat([qgm(x) for x in val.x.split(50)])
        got = torch.cat([torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]) for x in val.x.split(50)])
    n = len(val)
    out = {
        "model": args.model,
        "weight_bits": args.weight_bits,
        "calib_images": len(calib),
        "val_images": n,
        "max_abs_logit_diff": float((got - ref).abs().max()),
        "logit_abs_max": float(ref.abs().max()),
        "top1_agreement": 100.0 * float((got.argmax(1) == ref.argmax(1)).float().mean()),
        "top1_reference": 100.0 * float((ref.argmax(1) == val.y).float().mean()),
        "top1_onnxruntime": 100.0 * float((got.argmax(1) == val.y).float().mean()),
    }
    print(f"{args.model} W{args.weight_bits}A8 on {n} val images (calibration {len(calib)}):")
    print(
        f"  top-1 reference {out['top1_reference']:.2f}, ONNX Runtime {out['top1_onnxruntime']:.2f}; "
        f"same top-1 on {out['top1_agreement']:.2f} % of images; max |logit diff| {out['max_abs_logit_diff']:.3f} "
        f"(logits up to {out['logit_abs_max']:.1f})"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
