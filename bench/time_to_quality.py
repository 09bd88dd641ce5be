"""EPTQ time to quality on this machine: top-1 against the wall time of the whole quantization, by path.

    python bench/time_to_quality.py --bits 4 --budgets 5m,15m --paths radam,adam [--json FILE] [--plot FILE]
    python bench/time_to_quality.py --model cifar10_resnet20 --bits 3 --lengths 1000 --batch-size 32 --paths radam,adam

Rows: float; RTN; for each path, one EPTQ run per --budgets entry (`time_budget`: the schedule planned to end
inside it) and per --lengths entry (a fixed iteration count). A path is a set of rounding settings (PATHS below;
`radam` is MCT's optimizer and fxq's default, `adam` the same at the full learning rate from the first steps).
The wall time is fxq.quantize's: trace, calibration, LFH and rounding (image loading and the evaluation not
counted). Every row calibrates on all calibration images without labels and is evaluated on every val image: top-1,
and the label-free distances to the float model there (the share of images whose top-1 is float's, the mean KL),
with each image's KL and top-1 class kept for paired comparisons (bench/paired.py);
rows are written to --json as they finish and skipped when the script runs again, so an interrupted run resumes.
`--plot` draws top-1 against wall time, with RTN, float and the reference implementation's CPU run (MCT 2.6.1,
../shared/anchors/README.md) where the model is EfficientNet-Lite0; `--plot-from` adds the rows of other --json
files of the same setting (other seeds, paths or budgets run apart).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

import fxq
from fxq.config import LFHConfig, Method, PTQConfig, RoundingConfig, WeightError
from fxq.data.evaluate import evaluate, log_probs
from fxq.data.images import batches, load_images
from fxq.data.models import DEFAULT_MODEL, default_image_sets, load_model
from fxq.eptq.budget import parse_duration
from fxq.io.files import write_json_atomic
from fxq.targets import INT8, CpuClock

PATHS = {
    "radam": {},
    "adam": {"optimizer": "adam"},
    "layerwise": {"start": "layerwise"},  # from each layer's own error-feedback rounding (fxq.eptq.layerwise)
    "layerwise-adam": {"start": "layerwise", "optimizer": "adam"},
    "layerwise-all": {"start": "layerwise", "start_images": None},  # the start reads every calibration image
    # the steps through the whole graph: no frozen prefix (fxq.eptq.prefix)
    "layerwise-whole": {"start": "layerwise", "frozen_share": 0.0},
    "layerwise-all-whole": {"start": "layerwise", "start_images": None, "frozen_share": 0.0},
    # a larger frozen prefix: the first layers up to 3 % / 10 % of the weights stay at their layer-local choice
    "layerwise-f03": {"start": "layerwise", "frozen_share": 0.03},
    "layerwise-f10": {"start": "layerwise", "frozen_share": 0.1},
    # the steps train the tail alone: on Lite0 0.15 freezes every block down to 14 x 14 (0 to 10), 0.3 the first
    # two at 7 x 7 too; the tail holds most of the error left after the start
    "layerwise-f15": {"start": "layerwise", "frozen_share": 0.15},
    "layerwise-f30": {"start": "layerwise", "frozen_share": 0.3},
    # half of each layer's start objective weighs its output positions by the output's sensitivity to them
    "layerwise-s05": {"start": "layerwise", "start_sensitivity": 0.5},
    # each layer rounds its own float weights on its quantized inputs (GPTQ's aim) instead of the float output's
    "layerwise-noaim": {"start": "layerwise", "start_aim": False},
    # the model output's share of the distillation weights (the LFH gives Lite0's 7.8 %)
    "layerwise-out25": {"start": "layerwise", "output_share": 0.25},
    # schedule settings after the layer-local start
    "layerwise-sure": {"start": "layerwise", "start_confidence": 0.95},  # V starts nearer the choice (0.75)
    "layerwise-nowarm": {"start": "layerwise", "warmup": 0.0},  # the regulariser from the first step (0.2)
    "layerwise-warm40": {"start": "layerwise", "warmup": 0.4},  # the regulariser off for 40 % of the steps
    "layerwise-c55": {"start": "layerwise", "start_confidence": 0.55},  # V starts nearer undecided
    "layerwise-c55-w50": {"start": "layerwise", "start_confidence": 0.55, "warmup": 0.5},
    "layerwise-bias": {"start": "layerwise", "start_confidence": 1.0},  # V kept at the choice: the biases alone train
    "layerwise-lr1e-2": {"start": "layerwise", "lr_rounding": 1e-2},  # a third of the learning rate
    # the keep-best check's 128 images kept out of the start and the steps: its loss is one on images never fit
    "layerwise-apart": {"start": "layerwise", "check_apart": True},
    # V at a tenth of the learning rate once the regulariser is on (a gentler hardening), or at 3.3x
    "layerwise-apart-h3e-3": {"start": "layerwise", "check_apart": True, "lr_rounding_hardening": 3e-3},
    "layerwise-apart-h1e-1": {"start": "layerwise", "check_apart": True, "lr_rounding_hardening": 1e-1},
    # the output's KL from the float model's softmax added to each step's loss, at weight 1
    "layerwise-kl1": {"start": "layerwise", "output_kl": 1.0},
    # per-channel step factors trained beside V and the biases (SGD at 1e-2)
    "layerwise-scale": {"start": "layerwise", "train_scale": True, "lr_scale": 1e-2},
    # every activation step trained beside V (LSQ's gradient on a log factor, at lr_act_steps 1e-3)
    "radam-act": {"train_act_steps": True},
    "layerwise-act": {"start": "layerwise", "train_act_steps": True},
    "layerwise-all-act": {"start": "layerwise", "start_images": None, "train_act_steps": True},
    # coordinate descent on each layer's error after the start's error feedback, up to 8 passes
    "layerwise-cd": {"start": "layerwise", "start_sweeps": 8},
    "layerwise-all-cd": {"start": "layerwise", "start_images": None, "start_sweeps": 8},
    # the frozen prefix trained alone first, through the prefix alone, on its end's error (fxq.eptq.prefix)
    "layerwise-prefix": {"start": "layerwise", "prefix_steps": 200},
    "layerwise-prefix800": {"start": "layerwise", "prefix_steps": 800},
    # QDrop: half of each activation quantizer's elements left float in every step's forward
    "radam-drop": {"act_drop": 0.5},
    "layerwise-drop": {"start": "layerwise", "act_drop": 0.5},
    # the layer-local choice kept (confidence 1); the steps train only the biases and per-channel step factors
    "layerwise-tune": {"start": "layerwise", "start_confidence": 1.0, "train_scale": True},
    "layerwise-tune-fast": {
        "start": "layerwise",
        "start_confidence": 1.0,
        "train_scale": True,
        "lr_bias": 1e-2,
        "lr_scale": 1e-2,
    },
}
# the reference implementation on a 2-core CPU, Lite0 W4A8: (seconds, top-1), ../shared/anchors/README.md
MCT_CPU = {(DEFAULT_MODEL, 4): [(1250.0, 61.38)]}


def configs(args) -> dict[str, PTQConfig]:
    def cfg(method: Method, budget: float | None = None, **rounding) -> PTQConfig:
        return PTQConfig(
            target=INT8.with_bits(args.bits, args.act_bits),
            method=method,
            rounding=RoundingConfig(**{"batch_size": args.batch_size, "seed": args.seed, **rounding}),
            lfh=LFHConfig(min_probes=10, max_probes=args.lfh_probes, seed=args.seed),
            weight_error=args.weight_error,
            time_budget=budget,
            progress=not args.quiet,
        )

    seed = f" seed {args.seed}" if args.seed else ""
    # the weight thresholds are the RTN row's too: another choice of them is another row, RTN included
    width = f"W{args.bits}A{args.act_bits}" + (
        "" if args.weight_error == WeightError.MSE.value else f" {args.weight_error}-thresholds"
    )
    out = {f"RTN {width}": cfg(Method.RTN)}
    for path in args.paths:
        for text in args.budgets:
            out[f"{path} {width} b{args.batch_size} budget {text}{seed}"] = cfg(
                Method.EPTQ, parse_duration(text), **PATHS[path]
            )
        for n in args.lengths:
            out[f"{path} {width} {n} x {args.batch_size}{seed}"] = cfg(Method.EPTQ, iterations=n, **PATHS[path])
    return out


def plot(rows: dict, model: str, bits: int, path: str) -> None:
    """Top-1 against wall time: one line per path and seed (its budgets and lengths), RTN, float and MCT."""
    from fxq.io.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    ax.axhline(rows["float"]["top1"], color="k", lw=0.8, label="float")
    rtn = rows.get(f"RTN W{bits}A8")
    if rtn:
        ax.axhline(rtn["top1"], color="gray", ls="--", lw=0.8)
        ax.plot([rtn["quantize_seconds"]], [rtn["top1"]], "s", color="gray", label="RTN")
    line = 0
    rows = {k: r for k, r in rows.items() if "-thresholds" not in k}  # the default weight thresholds' rows alone
    for name in PATHS:
        for seed in sorted({r.get("seed", 0) for k, r in rows.items() if k.startswith(f"{name} W{bits}A8 ")}):
            pts = sorted(
                (r["quantize_seconds"], r["top1"], r["rounding"]["iterations"])
                for k, r in rows.items()
                if k.startswith(f"{name} W{bits}A8 ") and r.get("seed", 0) == seed
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"fxq EPTQ, {name}, seed {seed}")
            for t, acc, steps in pts:  # labels of alternate lines below and above their points
                ax.annotate(
                    f"{steps}", (t, acc), textcoords="offset points", xytext=(4, 5 - 15 * (line % 2)), fontsize=7
                )
            line += 1
    mct = MCT_CPU.get((model, bits), [])
    for t, acc in mct:
        ax.plot([t], [acc], "x", color="tab:red", ms=9, label="MCT 2.6.1 EPTQ path (reference)")
    # the EPTQ rows sit within a few points of float: the axis spans them, and names the marks below it
    eptq = [r["top1"] for k, r in rows.items() if "rounding" in r and k.split(" ")[0] in PATHS]
    if eptq:
        low = min(eptq) - 1.0
        below = [
            f"{what} {acc:.2f}"
            for what, acc in [("RTN", rtn["top1"] if rtn else None)] + [("MCT", a) for _, a in mct]
            if acc is not None and acc < low
        ]
        ax.set_ylim(low, rows["float"]["top1"] + 0.5)
        if below:
            ax.text(0.99, 0.02, "below the axis: " + ", ".join(below), transform=ax.transAxes, ha="right", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("wall time of the quantization, s (log; 2-core CPU); numbers: whole-network steps")
    ax.set_ylabel(f"top-1 on {rows['float']['images']} val images, %")
    ax.set_title(f"{model} W{bits}A8: accuracy against time", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def merged_rows(files: list[str], setting: dict) -> dict:
    """The rows of several --json files of one model, machine and thread count; a row in two files (RTN, float)
    is taken from the first."""
    rows: dict = {}
    for f in files:
        done = json.loads(Path(f).read_text())
        if done["setting"] != setting:
            raise SystemExit(f"{f} was measured with {done['setting']}, not {setting}: plot files of one setting")
        for k, r in done["rows"].items():
            rows.setdefault(k, r)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--act-bits", type=int, default=8)
    p.add_argument("--paths", type=lambda s: s.split(","), default=["radam"], help=f"from {','.join(PATHS)}")
    p.add_argument("--budgets", type=lambda s: [t for t in s.split(",") if t], default=[], help="e.g. 5m,15m")
    p.add_argument("--lengths", type=lambda s: [int(t) for t in s.split(",") if t], default=[], help="iterations")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lfh-probes", type=int, default=16)
    p.add_argument(
        "--weight-error",
        default=WeightError.MSE.value,
        choices=[e.value for e in WeightError],
        help="what each weight channel's threshold minimises (PTQConfig.weight_error)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="default: runs/time_to_quality_MODEL.json")
    p.add_argument("--plot", default=None)
    p.add_argument("--plot-from", type=lambda s: s.split(","), default=[], help="more --json files to plot beside")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--save-dir", default=None, help="each row's quantized model saved (fxq.save) in a folder here")
    args = p.parse_args()
    fxq.keep_freed_memory()  # as the command line does (fxq.memory)
    unknown = set(args.paths) - set(PATHS)
    if unknown:
        p.error(f"unknown path(s) {sorted(unknown)}; choose from {','.join(PATHS)}")
    lm = load_model(args.model)
    calib_dir, val_dir = default_image_sets(args.model)
    calib = load_images(calib_dir, lm.preprocess, progress=False)
    val = load_images(val_dir, lm.preprocess, labeled=True, progress=False)
    path = Path(args.json or f"runs/time_to_quality_{args.model}.json")
    setting = {"model": args.model, "threads": torch.get_num_threads(), "calib": len(calib), "val": len(val)}
    done = json.loads(path.read_text()) if path.is_file() else {"setting": setting, "rows": {}}
    if done["setting"] != setting:  # its rows stay: another thread count or image set is another file's
        raise SystemExit(f"{path} holds rows measured with {done['setting']}, not {setting}: give another --json")
    if "float" not in done["rows"]:
        done["rows"]["float"] = evaluate(lm.model, val.x, val.y, progress=False)
    reference = None  # the float model's log-probabilities on the val images, for the label-free distances
    for name, cfg in configs(args).items():
        if name in done["rows"]:
            continue
        if reference is None:
            reference = log_probs(lm.model, val.x)
        clock = CpuClock()
        qgm, report = fxq.quantize(lm.model, batches(calib.x, 32), cfg)
        spent = clock.read()
        seconds = spent["wall_seconds"]
        # per image too, for paired comparisons of rows on the same images (bench/paired.py)
        row = evaluate(qgm, val.x, val.y, progress=False, reference=reference, per_image=True)
        row["kl_images"] = [round(v, 6) for v in row["kl_images"]]
        row.update(quantize_seconds=seconds, seed=args.seed)
        if args.save_dir:  # e.g. for bench/error_sources.py --load
            fxq.save(qgm, Path(args.save_dir) / re.sub(r"[^\w.-]+", "_", name), model_name=args.model, report=report)
        row.update(cpu_seconds=spent["cpu_seconds"], stolen_share=spent["stolen_share"])
        row["stage_seconds"] = report.stage_seconds
        row["lfh_probes"] = report.lfh_probes
        row["rounding"] = {k: v for k, v in report.rounding.items() if k != "history"}
        done["rows"][name] = row
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(str(path), done)
        steps = row["rounding"].get("iterations", 0)
        stolen = "" if spent["stolen_share"] is None else f", {spent['stolen_share']:.0%} stolen"
        share = row["rounding"].get("rounding_changed")
        changed = "" if share is None else f"  rounding changed on {share:.2%} of the weights"
        r = row["rounding"]
        check = f"  check loss {r['check_loss']:.4f} (RTN {r['rtn_check_loss']:.4f})" if "check_loss" in r else ""
        print(
            f"{name:<40} top-1 {row['top1']:6.2f} ({row['correct1']}/{row['images']})  {seconds:7.1f} s "
            f"({spent['cpu_seconds']:.0f} CPU s{stolen})  {steps} steps  agrees with float {row['agreement']:.2%}  "
            f"KL {row['kl']:.4f}{changed}{check}"
        )
    if args.plot:
        plot(merged_rows([str(path), *args.plot_from], setting), args.model, args.bits, args.plot)


if __name__ == "__main__":
    main()
