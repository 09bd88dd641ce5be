"""Mixed-precision RTN on Lite0 (4 and 3 bits/weight) with any fxq source tree, to time two commits side by side.

    git worktree add /tmp/old 166f964 && ln -s ../passes /tmp/old/fxq/passes && ln -s ../kernels /tmp/old/fxq/kernels
    python bench/mp_ab.py /tmp/old before.json     # the tree before the change
    python bench/mp_ab.py . after.json              # this one

Times the analysis, then per budget the allocation (ILPs + label-free choice) and the rest of the quantization,
and records top-1 on the 650 val images and the widths, so that the two runs can be checked to agree.
"""
# ruff: noqa: E402  (fxq is imported after choosing which tree it comes from)

import json
import sys
import time
from pathlib import Path

root = str(Path(sys.argv[1]).resolve())
if root != str(Path(__file__).resolve().parents[1]):  # another tree: import it instead of the installed fxq
    sys.path.insert(0, root)
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]
import torch

import fxq
from fxq.config import LFHConfig, Method, MixedPrecisionConfig, PTQConfig
from fxq.data.evaluate import evaluate
from fxq.data.images import batches, default_data_dir, load_images
from fxq.data.models import load_model
from fxq.ir.meta import gq
from fxq.pipeline import allocate, analyze, quantize_analyzed
from fxq.targets import INT8


def cfg(avg):
    return PTQConfig(
        target=INT8.with_bits(4),
        method=Method.RTN,
        mixed_precision=MixedPrecisionConfig(avg_bits=avg),
        lfh=LFHConfig(min_probes=10, max_probes=32),
        progress=False,
    )


def main() -> None:
    print("fxq from", fxq.__file__, flush=True)
    lm = load_model("efficientnet_lite0")
    calib = load_images(str(default_data_dir() / "imagenet" / "calib"), lm.preprocess, progress=False)
    val = load_images(str(default_data_dir() / "imagenet" / "val"), lm.preprocess, labeled=True, progress=False)
    xs = batches(calib.x, 32)

    out = {"root": root, "threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    analyzed = analyze(lm.model, xs, cfg(4.0))
    out["analysis_seconds"] = time.perf_counter() - t0
    out["analysis_stages"] = dict(gq(analyzed).stage_seconds)
    total = out["analysis_seconds"]
    for avg in (4.0, 3.0):
        t1 = time.perf_counter()
        gm = allocate(analyzed, xs, cfg(avg))
        t2 = time.perf_counter()
        qgm, rep = quantize_analyzed(gm, xs, cfg(avg))
        t3 = time.perf_counter()
        acc = evaluate(qgm, val.x, val.y, progress=False)
        m = rep.mixed_precision
        out[f"{avg:g}"] = {
            "allocation_seconds": t2 - t1,
            "quantize_seconds": t3 - t2,
            "top1": acc["top1"],
            "correct1": acc["correct1"],
            "images": acc["images"],
            "selected": m.get("selected"),
            "agreement": m.get("agreement"),
            "calib_images": rep.calib_images,
            "bits": m["bits"],
        }
        total += t3 - t1
        print(avg, out[f"{avg:g}"]["top1"], out[f"{avg:g}"]["correct1"], t2 - t1, t3 - t2, flush=True)
    out["analysis_plus_budgets_seconds"] = total
    Path(sys.argv[2]).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k not in ("4", "3")}, indent=1))


if __name__ == "__main__":
    main()
