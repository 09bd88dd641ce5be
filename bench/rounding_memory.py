"""Memory the rounding optimization takes per quantized weight: the peak of the process over its size when the
rounding starts, on an MLP large enough that everything else is small beside its weights.

    python bench/rounding_memory.py [--width 4096] [--allocator keep|system] [--tree DIR]

The model: 4 linear layers of width x width (67M weights at 4096), bias correction on, 4-bit weights, 2 steps of 4
images with the regulariser on from the first step, the teacher recomputed (no cache), the keep-best check on.
`keep` calls fxq.keep_freed_memory() first, as the command line and the bench scripts do: freed buffers stay in the
process, so its size is the heap's high-water mark with its fragments; `system` leaves the C library's default,
which unmaps large freed buffers, so the size follows what is live. fxq.eptq.train's _BYTES_PER_WEIGHT reads
these figures (one per policy) to cut a model into groups of layers that fit.
"""

from __future__ import annotations

import argparse
import json
import resource

import source_tree  # noqa: F401  (--tree DIR: import fxq from DIR)
import torch
from torch import nn

import fxq
from fxq.config import LFHConfig, Method, PTQConfig, RoundingConfig
from fxq.eptq import train


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--allocator", choices=("keep", "system"), default="keep")
    p.add_argument("--tree", default=None, help="measure another source tree (see bench/source_tree.py)")
    args = p.parse_args()
    if args.allocator == "keep":
        fxq.keep_freed_memory()
    torch.manual_seed(0)
    w = args.width
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(w, w), nn.ReLU())]).eval()
    calib = [torch.randn(4, w) for _ in range(2)]
    at = {}
    run = train.RoundingOptimizer.run

    def measured(self, gm):
        at["start"], at["peak_before"] = _rss(), _peak()
        return run(self, gm)

    train.RoundingOptimizer.run = measured
    rounding = RoundingConfig(iterations=2, batch_size=4, warmup=0.0, teacher_cache="off")
    lfh = LFHConfig(images=4, batch_size=4, min_probes=2, max_probes=2)
    cfg = PTQConfig(target=fxq.INT8.with_bits(4), method=Method.EPTQ, rounding=rounding, lfh=lfh, progress=False)
    fxq.quantize(model, calib, cfg)
    weights = 4 * w * w
    grown = _peak() - max(at["start"], at["peak_before"])
    print(
        json.dumps(
            {
                "allocator": args.allocator,
                "weights": weights,
                "rss_at_start_gib": round(at["start"] / 2**30, 2),
                "peak_gib": round(_peak() / 2**30, 2),
                "bytes_per_weight": round(grown / weights, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
