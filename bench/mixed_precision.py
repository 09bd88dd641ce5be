"""Mixed precision on EfficientNet-Lite0 at the memory of uniform 3-bit and 4-bit weights, RTN and EPTQ.

    python bench/mixed_precision.py --iterations 800 --batch-size 8 [--json FILE]

The LFH and the sensitivities are measured once and every budget reuses them (as `fxq pareto` does). Uniform
rows at the same memory come from bench/rounding.py (same quantizer settings, images and schedule). Also
times the ILP on a synthetic 1000-layer x 3-width instance. Finished rows are kept in --json and skipped when
the script runs again, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from fxq.config import LFHConfig, Method, MixedPrecisionConfig, PTQConfig, RoundingConfig, measure_fields
from fxq.data.evaluate import evaluate
from fxq.data.images import batches, default_data_dir, load_images
from fxq.data.models import load_model
from fxq.io.files import write_json_atomic
from fxq.ir.meta import gq
from fxq.ir.ops import pick_device
from fxq.mp.ilp import Budget, solve_allocation
from fxq.pipeline import allocate, analyze, quantize_analyzed
from fxq.targets import INT8


def ilp_seconds(layers: int = 1000, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    cost = np.sort(rng.random((layers, 3)), 1)[:, ::-1].copy()
    memory = rng.integers(1000, 100_000, (layers, 1)) * np.array([[2, 4, 8]]) / 8
    return solve_allocation(cost, [Budget("memory", memory, float(memory[:, 1].sum()))]).seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = default_data_dir() / "imagenet"
    p.add_argument("--calib", default=str(data / "calib"))
    p.add_argument("--val", default=str(data / "val"))
    p.add_argument("--budgets", default="3,4", help="average bits per weight")
    p.add_argument("--iterations", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--mp-loss-weights",
        default="auto",
        help="sensitivity measure(s): auto (fxq's default: lfh and output, the better kept), or a list as in the CLI",
    )
    p.add_argument("--methods", default="rtn,eptq", help="which rows per budget: rtn, eptq or both")
    p.add_argument("--seed", type=int, default=0, help="the rounding's seed (batch order, probes)")
    p.add_argument("--json", default="bench/mixed_precision_cpu.json")
    args = p.parse_args()

    path = Path(args.json)
    done = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
    done["ilp_1000x3_seconds"] = ilp_seconds()
    lm = load_model("efficientnet_lite0")
    lm.model.to(pick_device())  # the GPU when there is one
    calib = load_images(args.calib, lm.preprocess, progress=False)
    val = load_images(args.val, lm.preprocess, labeled=True, progress=False)
    xs = batches(calib.x, 32)
    budgets = [float(b) for b in args.budgets.split(",")]

    measures = measure_fields(args.mp_loss_weights)

    def cfg(avg: float, method: Method) -> PTQConfig:
        return PTQConfig(
            target=INT8.with_bits(4),
            method=method,
            mixed_precision=MixedPrecisionConfig(avg_bits=avg, **measures),
            rounding=RoundingConfig(iterations=args.iterations, batch_size=args.batch_size, seed=args.seed),
            lfh=LFHConfig(min_probes=10, max_probes=32),
            progress=False,
        )

    t0 = time.perf_counter()
    analyzed = analyze(lm.model, xs, cfg(budgets[0], Method.EPTQ))  # EPTQ: the LFH is measured for the rounding too
    stages = gq(analyzed).stage_seconds
    done["analysis"] = {
        "seconds": time.perf_counter() - t0,
        "lfh_seconds": stages.get("LFH"),
        "sensitivity_seconds": stages.get("Sensitivity"),
        "calibrate_seconds": stages.get("Calibrate"),  # once, shared by every budget's choice and final convert
        "sensitivity_images": gq(analyzed).mixed_precision.sensitivity_images,
        "stacked_layers": gq(analyzed).mixed_precision.stacked_layers,
    }
    write_json_atomic(str(path), done)
    for avg in budgets:
        for method in [Method(m) for m in args.methods.split(",")]:
            name = f"MP avg {avg:g} bits {method.value}" + (
                f" ({args.iterations} steps, batch {args.batch_size}" + (f", seed {args.seed})" if args.seed else ")")
                if method is Method.EPTQ
                else ""
            )
            if name in done["rows"]:
                continue
            c = cfg(avg, method)
            t1 = time.perf_counter()
            gm = allocate(analyzed, xs, c)
            allocation_seconds = time.perf_counter() - t1
            qgm, report = quantize_analyzed(gm, xs, c, lm.name)
            row = {**evaluate(qgm, val.x, val.y, progress=False), "quantize_seconds": time.perf_counter() - t1}
            m = report.mixed_precision
            keys = ("avg_bits", "weight_bytes", "solve_seconds", "bits", "measures", "selected", "agreement")
            row["mixed_precision"] = {k: m[k] for k in keys if k in m}
            row["allocation_seconds"] = allocation_seconds  # ILP per measure + the label-free choice
            row["bit_counts"] = {b: list(m["bits"].values()).count(b) for b in m["options"]}
            if report.rounding:
                row["rounding"] = {k: v for k, v in report.rounding.items() if k != "history"}
            done["rows"][name] = row
            write_json_atomic(str(path), done)
            print(f"{name:<50} top-1 {row['top1']:6.2f} ({row['correct1']}/{row['images']})  {row['bit_counts']}")
    print(json.dumps({k: v["top1"] for k, v in done["rows"].items()}, indent=1))
    print("analysis", done["analysis"], "ILP 1000x3:", done["ilp_1000x3_seconds"])


if __name__ == "__main__":
    main()
