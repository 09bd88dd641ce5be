"""Fused LFH kernel vs the PyTorch reference over many gradient tensors (one backward's worth), same run.

    python bench/lfh_kernel.py [--tensors 50] [--batch 32] [--dtype float32] [--json FILE]

The gradient shapes follow EfficientNet-Lite0's interest tensors at 224 px (channels 16..320, maps 112..7)
plus many small ones; both paths get the same list and fold it into fresh statistics; CUDA events time them.
On a machine without CUDA only the reference runs (and the script says so).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fxq.ir.ops import pick_device
from fxq.kernels.lfh_cuda import fused_update_for
from fxq.kernels.lfh_reduce import RunningStats, fused_update_reference_

SHAPES = [(16, 112), (24, 56), (24, 56), (40, 28), (40, 28), (80, 14), (80, 14), (80, 14), (112, 14), (112, 14)]
SHAPES += [(112, 14), (192, 7), (192, 7), (192, 7), (192, 7), (320, 7), (1000, 1)]


def grads(n: int, batch: int, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    shapes = [SHAPES[i % len(SHAPES)] for i in range(n)]
    return [torch.randn(batch, c, s, s, generator=g, device=device, dtype=dtype) for c, s in shapes]


def timed(fn, repeat: int, device: str) -> float:
    """Median seconds of fn() over `repeat` calls (synchronised; one warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tensors", type=int, default=50)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = pick_device().type
    gs = grads(args.tensors, args.batch, getattr(torch, args.dtype), device)
    rows = torch.arange(len(gs))
    fused = fused_update_for(device)

    def run(update) -> None:
        stats = RunningStats.zeros(len(gs), device)
        moved = torch.zeros(len(gs), dtype=torch.float64, device=device)
        flags = torch.zeros(len(gs), dtype=torch.bool, device=device)
        update(gs, rows, stats, moved, flags, 1, 1e-3)

    out = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "tensors": len(gs),
        "batch": args.batch,
        "dtype": args.dtype,
        "bytes": sum(g.numel() * g.element_size() for g in gs),
        "reference_ms": timed(lambda: run(fused_update_reference_), args.repeat, device) * 1e3,
    }
    if fused is not None:
        out["fused_ms"] = timed(lambda: run(fused), args.repeat, device) * 1e3
        out["speedup"] = out["reference_ms"] / out["fused_ms"]
        out["fused_GBps"] = out["bytes"] / out["fused_ms"] / 1e6
    else:
        out["fused_ms"] = None  # no CUDA or no kernel build: the reference alone
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
