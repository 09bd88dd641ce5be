"""Mixed precision by sensitivity measure: LFH-weighted interest tensors, their plain mean, or the output alone.

    python bench/mp_sensitivity.py [--json FILE]
    python bench/mp_sensitivity.py --model cifar10_resnet20 --budgets 4,3,2.5 [--json FILE]

A measure "lfh+output" solves the ILP under both and keeps the allocation whose RTN model agrees most with the
float model on the last 256 calibration images (`MixedPrecisionConfig.select_from`).

Weights pick from {2, 4, 8} at each average-bits budget, activations at 8 bits, RTN (no rounding optimization).
One analysis per measure, every budget reuses it (as `fxq pareto` does). Top-1 on all val images; on ImageNet
also the label-free agreement with the float model's top-1 on calibration images 500-999 (the calibration uses
all 1000; no labels are read). Finished rows are kept in --json and skipped when the script runs again.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fxq.config import LFHConfig, MixedPrecisionConfig, PTQConfig, measure_fields
from fxq.data.evaluate import evaluate
from fxq.data.images import batches, default_data_dir, load_images
from fxq.data.models import load_model
from fxq.io.files import write_json_atomic
from fxq.ir.meta import gq
from fxq.ir.ops import pick_device
from fxq.mp.select import top1, top1_agreement
from fxq.pipeline import allocate, analyze, quantize_analyzed
from fxq.targets import INT8

CIFAR = default_data_dir() / "cifar10"
IMAGENET = default_data_dir() / "imagenet"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--calib", default=None, help="default: the shared calib images of the model's dataset")
    p.add_argument("--val", default=None)
    p.add_argument("--measures", default="lfh,output,mean")
    p.add_argument("--budgets", default="4,3", help="average bits per weight")
    p.add_argument("--images", type=int, default=32, help="calibration images for the sensitivities")
    p.add_argument("--json", default="bench/mp_sensitivity_lite0_cpu.json")
    args = p.parse_args()

    lm = load_model(args.model)
    lm.model.to(pick_device())  # the GPU when there is one
    cifar = args.model.startswith("cifar")
    calib_path = args.calib or str(CIFAR / "cifar10_train_calib1000_jpeg.npz" if cifar else IMAGENET / "calib")
    val_path = args.val or str(CIFAR / "cifar10_test10k_jpeg.npz" if cifar else IMAGENET / "val")
    calib = load_images(calib_path, lm.preprocess, 1000, progress=False)
    val = load_images(val_path, lm.preprocess, labeled=True, progress=False)
    xs, held = batches(calib.x, 32), calib.x[500:]
    float_top1 = top1(lm.model, held)
    path = Path(args.json)
    done = json.loads(path.read_text()) if path.is_file() else {"model": args.model, "rows": {}}

    def cfg(measure: str, avg: float) -> PTQConfig:
        # "lfh+output": solve under both, keep the better-agreeing allocation
        mixed = MixedPrecisionConfig(avg_bits=avg, images=args.images, **measure_fields(measure))
        lfh = LFHConfig(min_probes=10, max_probes=32)
        return PTQConfig(target=INT8.with_bits(4), mixed_precision=mixed, lfh=lfh, progress=False)

    budgets = [float(b) for b in args.budgets.split(",")]
    for measure in args.measures.split(","):
        names = {avg: f"{measure} ({args.images} images), {avg:g} bits/weight" for avg in budgets}
        if all(n in done["rows"] for n in names.values()):
            continue
        t0 = time.perf_counter()
        analyzed = analyze(lm.model, xs, cfg(measure, budgets[0]))
        analysis = {"seconds": time.perf_counter() - t0, **gq(analyzed).stage_seconds}
        for avg, name in names.items():
            c = cfg(measure, avg)
            gm = allocate(analyzed, xs, c)
            qgm, report = quantize_analyzed(gm, xs, c, lm.name)
            row = evaluate(qgm, val.x, val.y, progress=False)
            row["agree_calib"] = top1_agreement(qgm, held, float_top1)
            bits = list(report.mixed_precision["bits"].values())
            row["layers_at"] = {b: bits.count(b) for b in (2, 4, 8)}
            row["avg_bits"] = report.mixed_precision["avg_bits"]
            row["analysis"] = analysis
            if "selected" in report.mixed_precision:
                row["selected"] = report.mixed_precision["selected"]
                row["selection_agreement"] = report.mixed_precision["agreement"]
            done["rows"][name] = row
            write_json_atomic(str(path), done)
            print(
                f"{name:<40} top-1 {row['top1']:6.2f} ({row['correct1']}/{row['images']})  "
                f"agree {row['agree_calib']:5.1f}  {row['layers_at']}  analysis {analysis['seconds']:.0f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
