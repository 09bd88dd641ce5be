"""Calibration + RTN time of a model on the calibration images, as a ratio to one float pass over them.

    python bench/calibration.py [--model efficientnet_lite0] [--num-calib 1000] [--batch-size 32] [--repeat 2]

Both sides see the same decoded tensors (decoding is timed apart), the same batch size and thread count;
the float pass and the quantization alternate `--repeat` times and the best of each is reported.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import fxq
from fxq.data.images import batches, default_data_dir, load_images
from fxq.data.models import load_model


@torch.no_grad()
def float_pass(model, xs) -> float:
    t0 = time.perf_counter()
    for x in xs:
        model(x)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--calib", default=str(default_data_dir() / "imagenet" / "calib"))
    p.add_argument("--num-calib", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()

    lm = load_model(args.model)
    t0 = time.perf_counter()
    calib = load_images(args.calib, lm.preprocess, args.num_calib, progress=False)
    decode = time.perf_counter() - t0
    xs = batches(calib.x, args.batch_size)
    cfg = fxq.PTQConfig(progress=False)
    floats, quants, stages = [], [], None
    float_pass(lm.model, xs[:2])  # warm-up
    for _ in range(args.repeat):
        floats.append(float_pass(lm.model, xs))
        t0 = time.perf_counter()
        _, report = fxq.quantize(lm.model, xs, cfg)
        quants.append(time.perf_counter() - t0)
        stages = report.stage_seconds
    f, q = min(floats), min(quants)
    out = {
        "model": args.model,
        "images": len(calib),
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "decode_s": decode,
        "float_pass_s": f,
        "calibration_rtn_s": q,
        "ratio": q / f,
        "stages_s": stages,
        "all_float_s": floats,
        "all_quant_s": quants,
    }
    print(f"{args.model}: {len(calib)} images, batch {args.batch_size}, {torch.get_num_threads()} threads")
    print(f"  float pass          {f:8.2f} s")
    print(f"  calibration + RTN   {q:8.2f} s   = {q / f:.2f}x one float pass (target <= 1.5x)")
    print("  stages: " + ", ".join(f"{k} {v:.2f}s" for k, v in stages.items()))
    print(f"  (decoding the images: {decode:.2f} s, not in either figure)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
