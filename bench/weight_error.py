"""Weight thresholds by the weight's own squared error (mse) or the layer output's (output), on Lite0 RTN.

    python bench/weight_error.py [--json FILE]

Rows per rule: uniform W4A8 and W3A8, and mixed precision at 4 and 3 bits/weight (one analysis each, as
`fxq pareto` does). Top-1 on all val images; also the label-free agreement with the float model's top-1 on the
calibration images 500-999 (the calibration uses all 1000; no labels are read).
"""

from __future__ import annotations

import argparse
import time

from fxq.config import LFHConfig, MixedPrecisionConfig, PTQConfig
from fxq.data.evaluate import evaluate
from fxq.data.images import batches, default_data_dir, load_images
from fxq.data.models import load_model
from fxq.io.files import write_json_atomic
from fxq.mp.select import top1, top1_agreement
from fxq.pipeline import allocate, analyze, quantize, quantize_analyzed
from fxq.targets import INT8


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = default_data_dir() / "imagenet"
    p.add_argument("--calib", default=str(data / "calib"))
    p.add_argument("--val", default=str(data / "val"))
    p.add_argument("--errors", default="mse,output")
    p.add_argument("--json", default="bench/weight_error_cpu.json")
    args = p.parse_args()

    lm = load_model("efficientnet_lite0")
    calib = load_images(args.calib, lm.preprocess, progress=False)
    val = load_images(args.val, lm.preprocess, labeled=True, progress=False)
    xs, held = batches(calib.x, 32), calib.x[500:]
    float_top1 = top1(lm.model, held)
    rows = {}

    def record(name: str, qgm, **extra) -> None:
        r = evaluate(qgm, val.x, val.y, progress=False)
        agree = top1_agreement(qgm, held, float_top1)
        rows[name] = {
            "top1": r["top1"],
            "correct1": r["correct1"],
            "images": r["images"],
            "agree_calib": agree,
            **extra,
        }
        print(f"{name:<28} top-1 {r['top1']:6.2f} ({r['correct1']}/{r['images']})  agree {agree:5.1f}", extra)
        write_json_atomic(args.json, {"rows": rows})

    for error in args.errors.split(","):
        for bits in (4, 3):
            t0 = time.perf_counter()
            qgm, _ = quantize(lm.model, xs, PTQConfig(target=INT8.with_bits(bits), weight_error=error, progress=False))
            record(f"{error} uniform W{bits}A8", qgm, quantize_seconds=time.perf_counter() - t0)

        def cfg(avg: float, error: str = error) -> PTQConfig:
            mixed = MixedPrecisionConfig(avg_bits=avg)
            lfh = LFHConfig(min_probes=10, max_probes=32)
            return PTQConfig(
                target=INT8.with_bits(4), weight_error=error, mixed_precision=mixed, lfh=lfh, progress=False
            )

        analyzed = analyze(lm.model, xs, cfg(4.0))
        for avg in (4.0, 3.0):
            c = cfg(avg)
            gm = allocate(analyzed, xs, c)
            qgm, report = quantize_analyzed(gm, xs, c)
            bits = list(report.mixed_precision["bits"].values())
            record(f"{error} MP {avg:g} bits/weight", qgm, layers_at={b: bits.count(b) for b in (2, 4, 8)})


if __name__ == "__main__":
    main()
