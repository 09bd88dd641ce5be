"""What in the LFH weighting makes it beat (or not) a plain mean of the distillation terms.

    python bench/lfh_ablation.py --model cifar10_resnet20 --bits 2,3 --seeds 0,1 --iterations 2000 --batch-size 32

The rounding loss weighs each interest tensor by lambda_z = log10(trace_z) - min log10(trace), the model output
joining with the largest lambda, all scaled to mean 1 (fxq.eptq.weights). Against the plain mean (every tensor
1) that changes two things at once: the output's share of the loss, and which hidden tensors count more. The
rows take them apart, same images, quantizers and schedule:

- `lfh`: the LFH weights (EPTQ);  `mean`: every tensor alike (the paper's Table 1 ablation);
- `mean+output`: every hidden tensor alike, the output at the LFH's output weight relative to them: the LFH's
  output share alone;
- `lfh-shuffled`: the LFH's hidden-tensor weights given to other tensors (a seeded permutation), the output as
  in `lfh`: the LFH's spread without its choice of tensors;
- `linear`: each tensor in proportion to its trace (the output at the largest), without the log and the
  subtraction of the smallest: the normalisation.

Also printed: the weights themselves (effective number of tensors, the output's share) and, with two seeds, the
Spearman correlation of the two seeds' traces (the probes' noise); with --structure only that, for the LFH of each
seed on 32 calibration images, and no rounding. Rows go to --json as they finish and are
skipped when the script runs again.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from lfh import spearman  # run as a script from bench/

import fxq
import fxq.eptq.train as train
from fxq.config import LFHConfig, LossWeights, Method, PTQConfig, RoundingConfig
from fxq.data.evaluate import evaluate
from fxq.data.images import batches, load_images
from fxq.data.models import default_image_sets, load_model
from fxq.eptq.weights import interest_weights
from fxq.io.files import write_json_atomic
from fxq.ir.meta import q
from fxq.ir.taps import interest_nodes
from fxq.targets import INT8

VARIANTS = ("lfh", "mean", "mean+output", "lfh-shuffled", "linear")


def variant_weights(lfh: torch.Tensor, traces: torch.Tensor, variant: str, seed: int) -> torch.Tensor:
    """The loss weights of `variant` from the LFH weights (the output first, mean 1) and the hidden tensors'
    traces, scaled to mean 1."""
    out, hidden = lfh[:1], lfh[1:]
    if variant == "linear":
        w = torch.cat([traces.max().reshape(1), traces])
    elif variant == "mean":
        w = torch.ones_like(lfh)
    elif variant == "mean+output":  # the output's weight relative to the hidden tensors' mean, as in the LFH's
        w = torch.cat([out / hidden.mean(), torch.ones_like(hidden)])
    elif variant == "lfh-shuffled":
        perm = torch.randperm(len(hidden), generator=torch.Generator().manual_seed(seed))
        w = torch.cat([out, hidden[perm]])
    else:
        w = lfh.clone()
    return w / w.mean()


def summary(w: torch.Tensor) -> dict:
    """Effective number of tensors (sum w)^2 / sum w^2, the output's share of the weight, the largest hidden one."""
    return {
        "tensors": len(w),
        "effective_tensors": round(float(w.sum() ** 2 / (w**2).sum()), 2),
        "output_share": round(float(w[0] / w.sum()), 4),
        "hidden_max_over_mean": round(float(w[1:].max() / w[1:].mean()), 3),
        "hidden_zero": int((w[1:] == 0).sum()),
    }


def structure(lm, calib_dir: str, seeds: list[int]) -> dict:
    """The LFH weights alone (no rounding), for each seed on the same 32 calibration images: their summary, the
    spread of the traces, the tensors at weight 0, the largest relative standard error and the seeds' agreement."""
    x = load_images(calib_dir, lm.preprocess, 32, progress=False).x
    out, traces = {}, {}
    for seed in seeds:
        cfg = LFHConfig(min_probes=10, max_probes=32, seed=seed)
        _, report = fxq.label_free_hessian(lm.model, [x], cfg, PTQConfig(progress=False))
        z = [lr for lr in report.layers if lr.interest]
        lam = torch.tensor([lr.lfh_weight for lr in z])
        t = torch.tensor([lr.lfh for lr in z])
        traces[seed] = t.tolist()
        out[f"seed {seed}"] = {
            **summary(torch.cat([lam.max().reshape(1), lam])),
            "trace_max_over_min": round(float(t.max() / t.min()), 2),
            "at_weight_0": [lr.node for lr in z if lr.lfh_weight == 0],
            "largest_relative_stderr": round(max(lr.lfh_stderr / lr.lfh for lr in z), 4),
        }
    if len(seeds) > 1:
        out["spearman_traces"] = round(spearman(traces[seeds[0]], traces[seeds[1]]), 4)
    return out


def table(rows: dict, a) -> None:
    """Top-1 per variant (rows) and seed (columns), with the mean over the seeds, for each width."""
    seeds = [int(s) for s in a.seeds.split(",")]
    for bits in (int(b) for b in a.bits.split(",")):
        print(f"W{bits}A8, {a.iterations} x {a.batch_size}: " + " | ".join(f"seed {s}" for s in seeds) + " | mean")
        for variant in a.variants.split(","):
            got = [rows.get(f"{variant} W{bits}A8 {a.iterations} x {a.batch_size} seed {s}") for s in seeds]
            cells = [f"{r['top1']:.2f} ({r['correct1']})" if r else "-" for r in got]
            mean = sum(r["top1"] for r in got) / len(got) if all(got) else None
            print(f"  {variant:<14}" + " | ".join(cells) + (f" | {mean:.2f}" if mean is not None else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar10_resnet20")
    p.add_argument("--bits", default="2,3")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--structure", action="store_true", help="the LFH weights' structure alone, no rounding runs")
    p.add_argument("--json", type=Path, default=None, help="default: runs/lfh_ablation_MODEL.json")
    a = p.parse_args()
    fxq.keep_freed_memory()
    unknown = set(a.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variant(s) {sorted(unknown)}; choose from {','.join(VARIANTS)}")
    path = a.json or Path(f"runs/lfh_ablation_{a.model}.json")
    done = json.loads(path.read_text()) if path.is_file() else {"rows": {}, "weights": {}}
    lm = load_model(a.model)
    calib_dir, val_dir = default_image_sets(a.model)
    if a.structure:
        print(json.dumps(structure(lm, calib_dir, [int(s) for s in a.seeds.split(",")]), indent=1))
        return
    calib = load_images(calib_dir, lm.preprocess, progress=False)
    val = load_images(val_dir, lm.preprocess, labeled=True, progress=False)
    if "float" not in done["rows"]:
        done["rows"]["float"] = evaluate(lm.model, val.x, val.y, progress=False)

    def save() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(str(path), done)

    for seed in (int(s) for s in a.seeds.split(",")):
        for bits in (int(b) for b in a.bits.split(",")):
            for variant in a.variants.split(","):
                key = f"{variant} W{bits}A8 {a.iterations} x {a.batch_size} seed {seed}"
                if key in done["rows"]:
                    continue
                seen = {}

                def weights(gm, kind, with_output, variant=variant, seed=seed, seen=seen):
                    w = interest_weights(gm, kind, with_output)
                    if kind is LossWeights.LFH and with_output:
                        seen["lfh"] = w.tolist()
                        traces = torch.tensor([q(n).lfh for n in interest_nodes(gm)], dtype=torch.float32)
                        w = variant_weights(w, traces, variant, seed)
                        seen["weights"] = w.tolist()
                    return w

                train.interest_weights = weights  # the rounding reads its loss weights through this name
                cfg = PTQConfig(
                    target=INT8.with_bits(bits),
                    method=Method.EPTQ,
                    rounding=RoundingConfig(iterations=a.iterations, batch_size=a.batch_size, seed=seed),
                    lfh=LFHConfig(min_probes=10, max_probes=32, seed=seed),
                    progress=False,
                )
                t0 = time.perf_counter()
                qgm, report = fxq.quantize(lm.model, batches(calib.x, 32), cfg)
                seconds = time.perf_counter() - t0
                row = {**evaluate(qgm, val.x, val.y, progress=False), "seconds": seconds, "seed": seed}
                row.update(variant=variant, bits=bits, check_loss=report.rounding.get("check_loss"))
                row["weights"] = summary(torch.tensor(seen["weights"]))
                done["rows"][key] = row
                traces = {lr.node: lr.lfh for lr in report.layers if lr.interest}
                done["weights"][f"seed {seed}"] = {"traces": traces, "lfh": summary(torch.tensor(seen["lfh"]))}
                save()
                print(
                    f"{key:<44} top-1 {row['top1']:6.2f} ({row['correct1']}/{row['images']})  {row['weights']}",
                    flush=True,
                )
    train.interest_weights = interest_weights
    table(done["rows"], a)
    seeds = [s for s in done["weights"]]
    if len(seeds) > 1:
        t0, t1 = done["weights"][seeds[0]]["traces"], done["weights"][seeds[1]]["traces"]
        done["spearman_traces"] = spearman(list(t0.values()), [t1[k] for k in t0])
        print(f"Spearman of the LFH traces, {seeds[0]} against {seeds[1]}: {done['spearman_traces']:.4f}")
        save()


if __name__ == "__main__":
    main()
