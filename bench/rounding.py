"""EPTQ rounding on EfficientNet-Lite0 (or a CIFAR-10 ResNet): the accuracy table and the time per step
against its bound.

    python bench/rounding.py --iterations 1500 --batch-size 8 [--json FILE]
    python bench/rounding.py --model cifar10_resnet20 --iterations 20000 --batch-size 32 --bits 4,3,2 --ablation 3,2

Rows: float; RTN W4A8 and W3A8; EPTQ W4A8 at MCT's short CPU setting (300 steps, batch 8, 480 images,
10 probes: MCT ends at 61.38 there); EPTQ W4A8 and W3A8 at --iterations; plain-mean distillation W3A8 (the
ablation); EPTQ W4A8 at MCT's GPU setting (1008 steps, batch 32, 500 images; MCT: 79.54) with CUDA, or on a
CPU when --only selects it (about 30 min on 2 cores). `--sweep 0,25,100` adds EPTQ W4A8 rows at those schedule
lengths (each a whole schedule: warm-up and annealing scale with it), to check that no length ends below RTN.
`--bits` and `--ablation` pick the widths of those rows (default 4,3 and 3); the MCT rows are Lite0's alone.
Every row calibrates on the same images with the same quantizer settings and is evaluated on the
same val images. Each finished row is written to --json at once and skipped when the script runs again with
the same settings, so an interrupted run resumes where it stopped.

The bound of one step is measured in the same process: a teacher forward (no grad) plus a student forward
and backward of the same batch, with fxq's own graphs (float graph, fake-quant graph).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import source_tree  # noqa: F401  (--tree DIR: import fxq from DIR)
import torch

import fxq
from fxq.config import LFHConfig, Method, PTQConfig, RoundingConfig
from fxq.data.evaluate import evaluate
from fxq.data.images import batches, load_images
from fxq.data.models import DEFAULT_MODEL, default_image_sets, load_model
from fxq.io.files import write_json_atomic
from fxq.ir.ops import device_of, pick_device
from fxq.targets import INT8

try:
    from step_bound import step_bound  # run as a script from bench/
except ImportError:  # pragma: no cover
    from bench.step_bound import step_bound


def rows(args) -> dict[str, PTQConfig]:
    def cfg(bits: int, method=Method.RTN, probes=(10, 32), **rounding) -> PTQConfig:
        return PTQConfig(
            target=INT8.with_bits(bits),
            method=method,
            rounding=RoundingConfig(
                **{"iterations": args.iterations, "batch_size": args.batch_size, **args.step_settings, **rounding}
            ),
            lfh=LFHConfig(min_probes=probes[0], max_probes=probes[1], seed=args.seed),
            progress=not args.quiet,
        )

    n, b = args.iterations, args.batch_size
    mct = {}  # MCT's anchors are Lite0's
    if args.model == DEFAULT_MODEL:
        gpu_row = "EPTQ W4A8 (MCT GPU setting: 1008 steps, batch 32, 500 images)"
        if torch.cuda.is_available() or (args.only and re.search(args.only, gpu_row)):
            mct[gpu_row] = cfg(4, Method.EPTQ, probes=(10, 100), iterations=1008, batch_size=32, images=500)
        mct["EPTQ W4A8 (MCT CPU setting: 300 steps, batch 8, 480 images)"] = cfg(
            4, Method.EPTQ, probes=(10, 10), iterations=300, batch_size=8, images=480
        )
    sweep = {f"EPTQ W4A8 ({k} steps, batch {b})": cfg(4, Method.EPTQ, iterations=k) for k in args.sweep}
    return {
        **{k: v for k, v in mct.items() if "GPU" in k},
        **sweep,
        **{f"RTN W{w}A8": cfg(w) for w in args.bits},
        **{k: v for k, v in mct.items() if "CPU" in k},
        **{f"EPTQ W{w}A8 ({n} steps, batch {b})": cfg(w, Method.EPTQ) for w in args.bits},
        **{
            f"plain-mean W{w}A8 ({n} steps, batch {b})": cfg(w, Method.EPTQ, loss_weights="mean") for w in args.ablation
        },
    }


def _int_list(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="efficientnet_lite0 or a CIFAR-10 ResNet (cifar10_resnet20)")
    p.add_argument("--calib", default=None, help="default: the model's shared calibration set")
    p.add_argument("--val", default=None, help="default: the model's shared labeled set")
    p.add_argument("--bits", type=_int_list, default=[4, 3], help="weight widths of the RTN and EPTQ rows")
    p.add_argument("--ablation", type=_int_list, default=[3], help="weight widths of the plain-mean rows")
    p.add_argument("--iterations", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--only", default=None, help="run only rows whose name matches this regular expression")
    p.add_argument("--sweep", type=_int_list, default=[], help="extra EPTQ W4A8 schedule lengths, e.g. 0,25,100")
    p.add_argument("--amp", choices=["auto", "on", "off"], default="auto", help="bf16 autocast (auto: on CUDA only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the student and teacher")
    p.add_argument("--json", default="bench/rounding_cpu.json")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--seed", type=int, default=0, help="seed of the LFH probes and the rounding's batches")
    p.add_argument("--tree", default=None, help="run another source tree (see bench/source_tree.py)")
    args = p.parse_args()
    fxq.keep_freed_memory()  # as the command line does (fxq.memory)
    args.step_settings = {
        "amp": {"auto": None, "on": True, "off": False}[args.amp],
        "compile": args.compile,
        "seed": args.seed,
    }

    lm = load_model(args.model)
    lm.model.to(pick_device())
    default_calib, default_val = default_image_sets(args.model)
    calib = load_images(args.calib or default_calib, lm.preprocess, progress=False)
    val = load_images(args.val or default_val, lm.preprocess, labeled=True, progress=False)
    path = Path(args.json)
    done = json.loads(path.read_text()) if path.is_file() else {}
    setting = {"threads": torch.get_num_threads(), "calib_images": len(calib), "val_images": len(val)}
    setting["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    setting["model"] = args.model
    if args.amp != "auto" or args.compile:  # rows of other step settings are other rows
        setting.update(amp=args.amp, compile=args.compile)
    if args.seed:
        setting["seed"] = args.seed
    prev = {"device": "cpu", "model": DEFAULT_MODEL, **done.get("setting", {})}  # files from before these keys
    if prev != setting:  # rows name their schedule; new machine/data/model: afresh
        done = {"setting": setting, "rows": {}}
    if "float" not in done["rows"]:
        done["rows"]["float"] = evaluate(lm.model, val.x, val.y, progress=False)
        write_json_atomic(str(path), done)
    for name, cfg in rows(args).items():
        if name in done["rows"] or (args.only and not re.search(args.only, name)):
            continue
        t0 = time.perf_counter()
        qgm, report = fxq.quantize(lm.model, batches(calib.x, 32), cfg)
        row = {**evaluate(qgm, val.x, val.y, progress=False), "quantize_seconds": time.perf_counter() - t0}
        row["stage_seconds"] = report.stage_seconds
        if report.rounding:
            r = report.rounding
            bound = step_bound(lm.model, qgm, calib.x[: r["batch_size"]].to(device_of(qgm)))
            row["rounding"] = {k: v for k, v in r.items() if k != "history"}
            row["rounding"]["bound_seconds"] = bound
            row["rounding"]["step_over_bound"] = r["seconds_per_step"] / bound if r["seconds_per_step"] else None
            row["loss_history"] = r["history"]
        done["rows"][name] = row
        write_json_atomic(str(path), done)
        print(
            f"{name:<60} top-1 {row['top1']:6.2f} ({row['correct1']}/{row['images']})  {row['quantize_seconds']:.0f} s"
        )
    print(json.dumps({k: v.get("top1") for k, v in done["rows"].items()}, indent=1))


if __name__ == "__main__":
    main()
