"""Activation widths chosen by the ILP against uniform activation widths, weights at 8 bits.

    python bench/act_mixed_precision.py [--model cifar10_resnet20] [--calib NPZ|DIR] [--val NPZ|DIR]
        [--json FILE]

Defaults: the CIFAR-10 ResNet-20 with its real weights, the 1000 CIFAR calib images, all 10,000 test images.
Rows: uniform W8A4/5/6/8, then mixed activation widths {4, 6, 8} at an average of 5 and 6 bits per value.
"""

from __future__ import annotations

import argparse
import time

import fxq
from fxq.data.evaluate import evaluate
from fxq.data.images import batches, default_data_dir, load_images
from fxq.data.models import load_model
from fxq.io.files import write_json_atomic


def main() -> None:
    cifar = default_data_dir() / "cifar10"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cifar10_resnet20")
    p.add_argument("--calib", default=str(cifar / "cifar10_train_calib1000_jpeg.npz"))
    p.add_argument("--val", default=str(cifar / "cifar10_test10k_jpeg.npz"))
    p.add_argument("--json", default="bench/act_mixed_precision_resnet20_cpu.json")
    args = p.parse_args()
    lm = load_model(args.model)
    calib = load_images(args.calib, lm.preprocess, 1000, progress=False)
    val = load_images(args.val, lm.preprocess, labeled=True, progress=False)
    rows = {}

    def run(name: str, act_bits: int, mixed: fxq.MixedPrecisionConfig | None = None) -> None:
        cfg = fxq.PTQConfig(target=fxq.INT8.with_bits(8, act_bits), mixed_precision=mixed, progress=False)
        t0 = time.perf_counter()
        qgm, report = fxq.quantize(lm.model, batches(calib.x, 32), cfg)
        row = {**evaluate(qgm, val.x, val.y, progress=False), "quantize_seconds": time.perf_counter() - t0}
        m = report.mixed_precision
        if m:
            chosen = list(m["act_bits"].values())
            row["act_avg_bits"] = m["act_avg_bits"]
            row["act_bit_counts"] = {b: chosen.count(b) for b in m["act_options"]}
            row["sensitivity_seconds"] = report.stage_seconds.get("Sensitivity")
            row["ilp_seconds"] = m["solve_seconds"]
        rows[name] = row
        write_json_atomic(args.json, {"model": args.model, "val_images": len(val), "rows": rows})
        extra = f"  {row['act_bit_counts']} at {row['act_avg_bits']:.3f} bits/value" if m else ""
        print(f"{name:<40} top-1 {row['top1']:6.2f} ({row['correct1']}/{row['images']}){extra}", flush=True)

    for a in (4, 5, 6, 8):
        run(f"uniform W8A{a}", a)
    for avg in (5.0, 6.0):
        mixed = fxq.MixedPrecisionConfig(act_bit_options=(4, 6, 8), act_avg_bits=avg)
        run(f"W8, activations {{4,6,8}} at {avg:g} bits", 8, mixed)


if __name__ == "__main__":
    main()
