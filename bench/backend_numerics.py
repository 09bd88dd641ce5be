"""A lowered backend (ONNX Runtime QDQ, or Inductor int8) against fxq's reference fake-quant model on the val images.

    python bench/backend_numerics.py --backend onnx|inductor-int8|qdq-eager [--model efficientnet_lite0] [--weight-bits 8]
        [--num-calib 1000] [--calib DIR|NPZ] [--val DIR|NPZ] [--json FILE]

Reports the max abs logit difference, the share of images whose top-1 class agrees (and the share among images
whose reference top-1 is not tied on the quantized output grid), and both accuracies.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

import fxq
from fxq.backends.inductor import compile_int8, to_qdq_form
from fxq.backends.onnx import export_onnx, ort_session
from fxq.data.images import batches, default_data_dir, load_images
from fxq.data.models import load_model


def lowered_logits(backend: str, qgm, images: torch.Tensor, tmp: str) -> torch.Tensor:
    """The backend's logits for `images`, 50 at a time."""
    if backend == "onnx":
        export_onnx(qgm, (images[:2],), f"{tmp}/q.onnx")
        sess = ort_session(f"{tmp}/q.onnx")
        return torch.cat([torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]) for x in images.split(50)])
    # qdq-eager: the same float graph with PT2E's quantize ops, which multiply by 1/s where fxq divides by s;
    # only ties round differently, so its disagreement is the floor any integer backend starts from
    run = to_qdq_form(qgm) if backend == "qdq-eager" else compile_int8(qgm, dynamic=False)
    return torch.cat([run(x) for x in images.split(50)])  # a fixed batch: one compile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["onnx", "inductor-int8", "qdq-eager"], default="onnx")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--weight-bits", type=int, default=8)
    p.add_argument("--num-calib", type=int, default=1000)
    p.add_argument("--calib", default=None, help="calibration images (folder or .npz); default: shared ImageNet calib")
    p.add_argument("--val", default=None, help="labeled images (folder or .npz); default: shared ImageNet val")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    data = default_data_dir() / "imagenet"
    lm = load_model(args.model)
    calib = load_images(args.calib or data / "calib", lm.preprocess, args.num_calib, progress=False)
    val = load_images(args.val or data / "val", lm.preprocess, labeled=True, progress=False)
    cfg = fxq.PTQConfig(target=fxq.INT8.with_bits(args.weight_bits), progress=False)
    qgm, _ = fxq.quantize(lm.model, batches(calib.x, 32), cfg)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        ref = torch.cat([qgm(x) for x in val.x.split(50)])
        got = lowered_logits(args.backend, qgm, val.x, tmp)
    n = len(val)
    top2 = ref.topk(2, dim=1).values
    untied = top2[:, 0] > top2[:, 1]
    same = got.argmax(1) == ref.argmax(1)
    out = {
        "backend": args.backend,
        "model": args.model,
        "weight_bits": args.weight_bits,
        "calib_images": len(calib),
        "val_images": n,
        "max_abs_logit_diff": float((got - ref).abs().max()),
        "logit_abs_max": float(ref.abs().max()),
        "top1_agreement": 100.0 * float(same.float().mean()),
        "untied_images": int(untied.sum()),
        "top1_agreement_untied": 100.0 * float(same[untied].float().mean()),
        "top1_reference": 100.0 * float((ref.argmax(1) == val.y).float().mean()),
        "top1_backend": 100.0 * float((got.argmax(1) == val.y).float().mean()),
    }
    print(f"{args.model} W{args.weight_bits}A8 on {n} val images (calibration {len(calib)}), backend {args.backend}:")
    print(
        f"  top-1 reference {out['top1_reference']:.2f}, backend {out['top1_backend']:.2f}; same top-1 on "
        f"{out['top1_agreement']:.2f} % of images ({out['top1_agreement_untied']:.2f} % of the "
        f"{out['untied_images']} whose reference top-1 is not tied); max |logit diff| "
        f"{out['max_abs_logit_diff']:.3f} (logits up to {out['logit_abs_max']:.1f})"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
