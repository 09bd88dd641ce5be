"""Memory peak of the LFH against one training step of the same batch (target: at most 1.5x).

    python bench/lfh_memory.py [--images 32] [--probes 2] [--json FILE]

Each phase runs in a fresh process: load the model and images (the baseline), then either one training step
(forward + backward with weight gradients, batch = images) or the LFH pass over the same images. On CPU the
peak is the process's max resident set size above the baseline; on CUDA it is torch.cuda.max_memory_allocated
above the memory held before the phase.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phase(kind: str, images: int, probes: int) -> dict:
    import fxq
    from fxq.data.images import default_data_dir, load_images
    from fxq.data.models import load_model
    from fxq.ir.ops import pick_device

    device = pick_device().type
    lm = load_model("efficientnet_lite0")
    model = lm.model.to(device)
    x = load_images(default_data_dir() / "imagenet" / "calib", lm.preprocess, images, progress=False).x.to(device)
    with torch.no_grad():
        model(x[:2])  # allocator and kernels warmed the same way in both phases
    base = torch.cuda.memory_allocated() if device == "cuda" else _rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if kind == "train_step":
        out = model(x)
        (out * torch.randn_like(out)).sum().backward()
    else:
        cfg = fxq.LFHConfig(min_probes=probes, max_probes=probes, images=images, batch_size=images)
        fxq.label_free_hessian(model, [x], cfg, fxq.PTQConfig(progress=False))
    if device == "cuda":
        return {"device": device, "peak_mb": (torch.cuda.max_memory_allocated() - base) / 2**20}
    return {"device": device, "peak_mb": _rss_mb() - base}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--probes", type=int, default=2)
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, args.images, args.probes)))
        return
    runs = {}
    for kind in ("train_step", "lfh"):
        cmd = [sys.executable, __file__, "--phase", kind, "--images", str(args.images), "--probes", str(args.probes)]
        runs[kind] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    out = {"images": args.images, "probes": args.probes, **runs}
    out["lfh_over_train_step"] = runs["lfh"]["peak_mb"] / runs["train_step"]["peak_mb"]
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
