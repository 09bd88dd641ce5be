"""Integer kernels against fp32 on this CPU: ONNX Runtime and Inductor, batch 1 and 32, ratios from one run.

    python bench/int8_speed.py [--models resnet18,mobilenet_v2,efficientnet_lite0] [--batch-sizes 1,32]
        [--iters 20] [--json FILE]

Each model is quantized W8A8 (RTN) for this CPU's integer form, on 32 calibration images (torchvision models with
random weights: speed does not depend on their values). The table heads with the CPU, its vector ISA and fxq's
ISA class, and gives the median latency of each backend in fp32 and int8 and their ratio.
"""

from __future__ import annotations

import argparse
import json

import torch

import fxq
from fxq.backends.latency import backend_latencies
from fxq.data.images import batches, load_images
from fxq.data.models import default_image_sets, load_model
from fxq.targets import INT8, cpu_description


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,mobilenet_v2,efficientnet_lite0")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(f"CPU {cpu_description()}, {torch.get_num_threads()} threads, median of {args.iters}")
    print(f"{'model':<20} {'backend':<26} {'batch':>5} {'fp32 ms':>9} {'int8 ms':>9} {'int8 speed-up':>13}")
    rows = []
    for name in args.models.split(","):
        lm = load_model(name, random_weights=name != "efficientnet_lite0")
        calib = load_images(default_image_sets(name)[0], lm.preprocess, 32, progress=False)
        qgm, _ = fxq.quantize(lm.model, batches(calib.x, 16), fxq.PTQConfig(target=INT8, progress=False))
        for r in backend_latencies(lm.model, qgm, lm.preprocess.crop, sizes, args.iters, ("onnx", "inductor-int8")):
            rows.append({"model": name, **r})
            print(
                f"{name:<20} {r['backend']:<26} {r['batch']:>5} {r['float_ms']:9.2f} {r['int8_ms']:9.2f} "
                f"{r['speedup']:12.2f}x",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"cpu": cpu_description(), "threads": torch.get_num_threads(), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
