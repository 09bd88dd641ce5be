"""Time per rounding step on EfficientNet-Lite0 (or --model) against its bound, teacher cached vs recomputed.

    python bench/rounding_step.py [--batch-sizes 8,32] [--steps 20] [--json FILE]
    python bench/rounding_step.py --batch-sizes 32 --cache on --amp auto,off --compile off,on   # on a GPU
    python bench/rounding_step.py --tree /tmp/old ...                   # an older commit's worktree, same script
    python bench/rounding_step.py --model cifar10_resnet20 --bits 2 --batch-sizes 32 --steps 300 --cache on
    python bench/rounding_step.py --batch-sizes 8 --cache on --frozen-share 0,0.01   # past a frozen prefix

The bound is one teacher forward (no grad) + one student forward and backward of the same batch with fxq's own
graphs (`bench/step_bound.py`). The rounding runs `--steps` steps with the regulariser on (warm-up 0)
so every step pays for it. With --frozen-share it starts from the layer-local rounding, and the steps run past the
first layers holding up to that share of the weights (fxq.eptq.prefix; 0: the whole graph). Each setting gives seconds per step over all `--steps` and after the first (which
compiles and warms up); the ratio to the bound uses the latter.
"""

from __future__ import annotations

import argparse
import itertools
import json

import source_tree  # noqa: F401  (--tree DIR: import fxq from DIR)
import torch

import fxq
from fxq.config import LFHConfig, Method, PTQConfig, RoundingConfig
from fxq.data.images import batches, load_images
from fxq.data.models import DEFAULT_MODEL, default_image_sets, load_model
from fxq.ir.ops import device_of, pick_device
from fxq.pipeline import analyze, quantize_analyzed

try:
    from step_bound import step_bound  # run as a script from bench/
except ImportError:  # pragma: no cover
    from bench.step_bound import step_bound


AMP = {"auto": None, "on": True, "off": False}


def _words(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="efficientnet_lite0 or a CIFAR-10 ResNet (cifar10_resnet20)")
    p.add_argument("--bits", type=int, default=4, help="weight width")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-sizes", default="8,32")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cache", type=_words, default=["on", "off"], help="teacher cache settings to time")
    p.add_argument("--amp", type=_words, default=["auto"], help="bf16 autocast settings to time: auto,on,off")
    p.add_argument("--compile", type=_words, default=["off"], help="torch.compile settings to time: off,on")
    p.add_argument(
        "--frozen-share",
        type=lambda s: [float(v) for v in _words(s)],
        default=[None],
        help="with the layer-local start: the frozen prefix's largest share of the weights to time, e.g. 0,0.01",
    )
    p.add_argument("--json", default=None)
    p.add_argument(
        "--allocator",
        choices=["keep", "system"],
        default="keep",
        help="keep: fxq.keep_freed_memory() as the command line does; system: the C library's defaults",
    )
    p.add_argument("--tree", default=None, help="time another source tree (see bench/source_tree.py)")
    args = p.parse_args()
    if args.allocator == "keep":
        fxq.keep_freed_memory()
    device = pick_device().type
    lm = load_model(args.model)
    lm.model.to(device)
    calib = load_images(default_image_sets(args.model)[0], lm.preprocess, args.images, progress=False)
    xs = batches(calib.x, 32)
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "threads": torch.get_num_threads()}
    lfh = LFHConfig(min_probes=2, max_probes=2)
    for b in (int(v) for v in args.batch_sizes.split(",")):
        timed = {}
        for cache, amp, comp, share in itertools.product(args.cache, args.amp, args.compile, args.frozen_share):
            start = {} if share is None else {"start": "layerwise", "frozen_share": share}
            rc = RoundingConfig(
                **start,
                iterations=args.steps,
                batch_size=b,
                warmup=0.0,
                keep_best=False,
                teacher_cache=cache,
                amp=AMP[amp],
                compile=comp == "on",
            )
            cfg = PTQConfig(
                target=fxq.INT8.with_bits(args.bits), method=Method.EPTQ, rounding=rc, lfh=lfh, progress=False
            )
            qgm, report = quantize_analyzed(analyze(lm.model, xs, cfg), xs, cfg)
            name = (
                f"batch{b}_cache_{cache}"
                + (f"_amp_{amp}" if amp != "auto" else "")
                + ("_compiled" if comp == "on" else "")
                + (f"_frozen_{share:g}" if share is not None else "")
            )
            out[f"{name}_s"] = report.rounding["seconds_per_step"]
            after_first = report.rounding.get("seconds_per_step_after_first")  # older trees lack it
            timed[name] = out[f"{name}_after_first_s"] = after_first or report.rounding["seconds_per_step"]
        bound = step_bound(lm.model, qgm, calib.x[:b].to(device_of(qgm)))
        out[f"batch{b}_bound_s"] = bound
        for name, seconds in timed.items():
            out[f"{name}_over_bound"] = seconds / bound
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items() if k.startswith(f"batch{b}")})
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
