"""LFH time on a model against its lower bound: probes x one forward+backward of the same batch.

    python bench/lfh.py [--model efficientnet_lite0] [--images 32] [--probes 10] [--probes-per-pass 1] [--seeds 0,1]

The bound is measured in the same run: `probes` forward+backward passes of the float model at the same batch
with a random output probe, weight gradients included (what one training step costs). fxq freezes weights, so
it can come in under the bound. With two seeds it also reports the Spearman rank correlation of the traces.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import fxq
from fxq.data.images import default_data_dir, load_images
from fxq.data.models import load_model
from fxq.ir.ops import pick_device


def bound(model, x: torch.Tensor, probes: int) -> float:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * torch.randn_like(out)).sum().backward()  # warm-up
    sync()
    t0 = time.perf_counter()
    for _ in range(probes):
        out = model(x)
        (out * torch.randn_like(out)).sum().backward()
    sync()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--calib", default=str(default_data_dir() / "imagenet" / "calib"))
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--probes", type=int, default=10)
    p.add_argument("--probes-per-pass", type=int, default=1)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--json", default=None)
    p.add_argument("--mct-json", default=None, help="output of bench/mct_lfh.py on the same images and probes")
    args = p.parse_args()

    lm = load_model(args.model)
    device = pick_device()
    lm.model.to(device)
    x = load_images(args.calib, lm.preprocess, args.images, progress=False).x.to(device)
    t_bound = bound(lm.model, x, args.probes)
    runs = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        cfg = fxq.LFHConfig(
            min_probes=args.probes,
            max_probes=args.probes,
            images=args.images,
            batch_size=args.images,
            probes_per_pass=args.probes_per_pass,
            seed=seed,
        )
        t0 = time.perf_counter()
        gm, report = fxq.label_free_hessian(lm.model, [x], cfg, fxq.PTQConfig(progress=False))
        total = time.perf_counter() - t0
        runs[seed] = {
            "seconds_total": total,
            "seconds_lfh": report.stage_seconds["LFH"],
            "traces": {lr.node: lr.lfh for lr in report.layers if lr.interest},
        }
    seeds = list(runs)
    best = min(r["seconds_lfh"] for r in runs.values())
    out = {
        "model": args.model,
        "images": args.images,
        "probes": args.probes,
        "probes_per_pass": args.probes_per_pass,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "bound_s": t_bound,
        "lfh_s": best,
        "ratio_to_bound": best / t_bound,
        "n_interest": len(runs[seeds[0]]["traces"]),
        "runs": runs,
    }
    if len(seeds) > 1:
        a, b = runs[seeds[0]]["traces"], runs[seeds[1]]["traces"]
        out["spearman_seeds"] = spearman(list(a.values()), [b[k] for k in a])
    print(
        f"{args.model}: {args.images} images, {args.probes} probes ({args.probes_per_pass} per backward), "
        f"{out['n_interest']} interest tensors, {out['threads']} threads"
    )
    print(f"  bound: {args.probes} x forward+backward of the batch  {t_bound:8.2f} s")
    print(f"  fxq LFH                                    {best:8.2f} s  = {best / t_bound:.2f}x the bound")
    if "spearman_seeds" in out:
        print(f"  Spearman of the traces, seed {seeds[0]} vs {seeds[1]}: {out['spearman_seeds']:.4f}")
    if args.mct_json:
        compare_with_mct(out, runs[seeds[0]]["traces"], args.mct_json)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


def compare_with_mct(out: dict, traces: dict[str, float], path: str) -> None:
    """MCT names a BN-folded conv after its BN: fxq's '<layer>_conv' is MCT's '<layer>_bn'."""
    with open(path) as fh:
        mct = json.load(fh)
    pairs = [
        (t, mct["scores"][k.removesuffix("_conv") + "_bn"])
        for k, t in traces.items()
        if k.removesuffix("_conv") + "_bn" in mct["scores"]
    ]
    out["mct"] = {
        "seconds": mct["seconds"],
        "probes": mct["probes"],
        "images": mct["images"],
        "common_tensors": len(pairs),
        "spearman": spearman(*map(list, zip(*pairs))),
        "speedup": mct["seconds"] / out["lfh_s"],
    }
    print(
        f"  MCT {mct['mct']} Hessian ({mct['probes']} probes x {mct['images']} images): {mct['seconds']:.1f} s "
        f"= {out['mct']['speedup']:.1f}x fxq's time; Spearman over the {len(pairs)} tensors both score: "
        f"{out['mct']['spearman']:.4f}"
    )


if __name__ == "__main__":
    main()
