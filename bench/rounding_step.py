"""Time per rounding step on EfficientNet-Lite0 against its bound, teacher cached vs recomputed, same run.

    python bench/rounding_step.py [--batch-sizes 8,32] [--steps 20] [--json FILE]

The bound is one teacher forward (no grad) + one student forward and backward of the same batch with fxq's own
graphs (bench/rounding.py's `step_bound`). The rounding runs `--steps` steps with the regulariser on (warm-up 0)
so every step pays for it; the first step is not timed apart (it is one of `--steps`).
"""

from __future__ import annotations

import argparse
import json

import torch

import fxq
from fxq.config import LFHConfig, Method, PTQConfig, RoundingConfig
from fxq.data import batches, default_data_dir, load_images
from fxq.models import load_model
from fxq.ops import device_of, pick_device
from fxq.pipeline import analyze, quantize_analyzed

try:
    from rounding import step_bound  # run as a script from bench/
except ImportError:  # pragma: no cover
    from bench.rounding import step_bound


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-sizes", default="8,32")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = pick_device().type
    lm = load_model("efficientnet_lite0")
    lm.model.to(device)
    calib = load_images(default_data_dir() / "imagenet" / "calib", lm.preprocess, args.images, progress=False)
    xs = batches(calib.x, 32)
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "threads": torch.get_num_threads()}
    lfh = LFHConfig(min_probes=2, max_probes=2)
    for b in (int(v) for v in args.batch_sizes.split(",")):
        for cache in ("on", "off"):
            rc = RoundingConfig(iterations=args.steps, batch_size=b, warmup=0.0, keep_best=False, teacher_cache=cache)
            cfg = PTQConfig(target=fxq.INT8.with_bits(4), method=Method.EPTQ, rounding=rc, lfh=lfh, progress=False)
            qgm, report = quantize_analyzed(analyze(lm.model, xs, cfg), xs, cfg)
            r = report.rounding
            out[f"batch{b}_cache_{cache}_s"] = r["seconds_per_step"]
        bound = step_bound(lm.model, qgm, calib.x[:b].to(device_of(qgm)))
        out[f"batch{b}_bound_s"] = bound
        for cache in ("on", "off"):
            out[f"batch{b}_cache_{cache}_over_bound"] = out[f"batch{b}_cache_{cache}_s"] / bound
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items() if k.startswith(f"batch{b}")})
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
