"""Operator launches per rounding step on EfficientNet-Lite0 against its bound: a CPU proxy for the GPU's cost.

    python bench/rounding_ops.py [--batch-size 2] [--json FILE]

At batch 32 on an H100, Lite0's step is short enough that launching kernels, not running them, can set its
time. Every aten operator dispatched below autograd (forward, backward, optimizer) is at least one launch, so
the count per step against the count of the bound (teacher forward + student forward + backward,
`bench/step_bound.py`) says how far from the bound a launch-bound GPU step can be, measured here
without a GPU. A step's count is the difference between a run of `--steps` + 2 steps and one of 2 steps, so
set-up, calibration and the LFH cancel. `--tree DIR` counts an older commit's worktree the same way.
"""

from __future__ import annotations

import argparse
from collections import Counter

import source_tree  # noqa: F401  (--tree DIR: import fxq from DIR)
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fxq
from fxq.config import LFHConfig, Method, PTQConfig, RoundingConfig
from fxq.data.images import batches, default_data_dir, load_images
from fxq.data.models import load_model
from fxq.io.files import write_json_atomic
from fxq.ir.graph import copy_graph
from fxq.pipeline import analyze, quantize_analyzed

try:
    from step_bound import step_bound  # run as a script from bench/
except ImportError:  # pragma: no cover
    from bench.step_bound import step_bound


class OpCounter(TorchDispatchMode):
    """Counts aten operators as they reach the kernels (after autograd), by name. Views launch nothing, and
    operators on 0-d tensors alone are the optimizers' step counters, which stay on the host on a GPU too: both
    are left out."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if not func.is_view and any(t.dim() > 0 for t in tensors):
            self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def count(fn) -> Counter[str]:
    with OpCounter() as c:
        fn()
    return c.ops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument(
        "--cache", default="on", choices=["on", "off"], help="teacher cache, the same in both runs so set-up cancels"
    )
    p.add_argument("--tree", default=None, help="count another source tree's step (fxq/passes linked to ../passes)")
    args = p.parse_args()
    lm = load_model("efficientnet_lite0")
    calib = load_images(default_data_dir() / "imagenet" / "calib", lm.preprocess, 8, progress=False)
    xs = batches(calib.x, 8)

    def config(steps: int) -> PTQConfig:
        rc = RoundingConfig(
            iterations=steps, batch_size=args.batch_size, warmup=0.0, keep_best=False, teacher_cache=args.cache
        )
        lfh = LFHConfig(images=2, min_probes=1, max_probes=1)
        return PTQConfig(target=fxq.INT8.with_bits(4), method=Method.EPTQ, rounding=rc, lfh=lfh, progress=False)

    analyzed = analyze(lm.model, xs, config(0))
    runs = {n: count(lambda n=n: quantize_analyzed(copy_graph(analyzed), xs, config(n))) for n in (2, 2 + args.steps)}
    step = runs[2 + args.steps] - runs[2]
    per_step = {k: v / args.steps for k, v in step.items()}
    qgm, _ = quantize_analyzed(copy_graph(analyzed), xs, config(0))
    bound = count(lambda: step_bound(lm.model, qgm, calib.x[: args.batch_size], repeat=1))
    bound_ops = sum(bound.values()) / 2  # step_bound runs one untimed warm-up pass plus `repeat`
    out = {
        "batch_size": args.batch_size,
        "step_ops": sum(per_step.values()),
        "bound_ops": bound_ops,
        "step_over_bound": sum(per_step.values()) / bound_ops,
        "step_top": dict(sorted(per_step.items(), key=lambda kv: -kv[1])[:60]),
        "bound_top": {k: v / 2 for k, v in sorted(bound.items(), key=lambda kv: -kv[1])[:60]},
    }
    print(f"ops per step {out['step_ops']:.0f}, per bound {bound_ops:.0f}: {out['step_over_bound']:.2f}x")
    for k, v in out["step_top"].items():
        print(f"  {k:<40} {v:8.1f}  (bound {out['bound_top'].get(k, bound[k] / 2):.1f})")
    if args.json:
        write_json_atomic(args.json, out)


if __name__ == "__main__":
    main()
