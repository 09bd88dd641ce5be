"""The `fxq` command line, over the same API as Python users call."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from fxq.config import ActThreshold, LFHConfig, Method, Probe, PTQConfig
from fxq.data import ImageSet, Preprocess, batches, default_data_dir, load_images
from fxq.errors import FxqError, ModelError
from fxq.evaluate import evaluate
from fxq.frontend import Frontend
from fxq.latency import BACKENDS
from fxq.meta import without_graph_state
from fxq.models import DEFAULT_MODEL, LoadedModel, load_model
from fxq.ops import set_eval_
from fxq.pipeline import label_free_hessian, quantize
from fxq.report import Report, write_json_atomic
from fxq.targets import INT8

__all__ = ["main", "save_quantized", "load_quantized"]

MODEL_FILE, REPORT_FILE = "model.pt", "report.json"


def save_quantized(out: str | os.PathLike, model: torch.nn.Module, report: Report, pre: Preprocess) -> None:
    """DIR/model.pt (the pickled GraphModule) and DIR/report.json, each written atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (MODEL_FILE + ".tmp")
    with without_graph_state(model):  # the report carries what it held
        torch.save(model, tmp)
    os.replace(tmp, out / MODEL_FILE)
    write_json_atomic(str(out / REPORT_FILE), {**report.to_dict(), "preprocess": asdict(pre)})


def load_quantized(folder: str | os.PathLike) -> tuple[torch.nn.Module, Preprocess]:
    """Load what `fxq quantize --out DIR` wrote. The file is a pickle: load only folders you trust."""
    import json

    folder = Path(folder)
    if not (folder / MODEL_FILE).is_file():
        raise ModelError(f"'{folder}' holds no {MODEL_FILE}; give a folder written by `fxq quantize --out`")
    model = torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=False)
    pre = Preprocess()
    if (folder / REPORT_FILE).is_file():
        p = json.loads((folder / REPORT_FILE).read_text()).get("preprocess")
        if p:
            pre = Preprocess(p["resize"], p["crop"], tuple(p["mean"]), tuple(p["std"]))
    return set_eval_(model), pre


def _data_args(p: argparse.ArgumentParser) -> None:
    data = default_data_dir() / "imagenet"
    p.add_argument("--calib", default=str(data / "calib"), help="calibration image folder (labels unused)")
    p.add_argument("--val", default=str(data / "val"), help="labeled evaluation folder (with labels.tsv)")
    p.add_argument("--num-calib", type=int, default=None, help="use the first N calibration images (default all)")
    p.add_argument("--num-val", type=int, default=None, help="evaluate on the first N val images (default all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name (default {DEFAULT_MODEL}) or torchvision name")
    p.add_argument("--weights", default=None, help="state-dict file for the model")
    p.add_argument("--random-weights", action="store_true", help="torchvision model with random weights (speed runs)")


def _quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--act-bits", type=int, default=8)
    p.add_argument("--method", default=Method.RTN.value, choices=[m.value for m in Method])
    p.add_argument("--act-threshold", default=ActThreshold.MSE.value, choices=[a.value for a in ActThreshold])
    p.add_argument("--frontend", default=Frontend.FX.value, choices=[f.value for f in Frontend])
    p.add_argument("--no-bias-correction", action="store_true")


def _config(args, weight_bits: int) -> PTQConfig:
    return PTQConfig(
        target=INT8.with_bits(weight_bits, args.act_bits),
        method=args.method,
        act_threshold=args.act_threshold,
        frontend=args.frontend,
        bias_correction=not args.no_bias_correction,
        progress=not args.quiet,
    )


def _load(args) -> tuple[LoadedModel, ImageSet, ImageSet | None]:
    lm = load_model(args.model, args.weights, args.random_weights)
    show = not args.quiet
    calib = load_images(args.calib, lm.preprocess, args.num_calib, progress=show)
    val = (
        None
        if getattr(args, "no_eval", False)
        else load_images(args.val, lm.preprocess, args.num_val, labeled=True, progress=show)
    )
    return lm, calib, val


def _accuracy_line(name: str, acc: dict, ref: dict | None = None) -> str:
    drop = f"  ({acc['top1'] - ref['top1']:+.2f} vs float)" if ref else ""
    return (
        f"{name:<10} top-1 {acc['top1']:6.2f}  top-5 {acc['top5']:6.2f}  on {acc['images']} images "
        f"({acc['correct1']} correct){drop}  [{acc['seconds']:.1f} s]"
    )


def cmd_quantize(args) -> None:
    cfg = _config(args, args.weight_bits)  # bad options fail before any image is read
    lm, calib, val = _load(args)
    t0 = time.perf_counter()
    qgm, report = quantize(lm.model, batches(calib.x, args.batch_size), cfg)
    report.stage_seconds["total_quantize"] = time.perf_counter() - t0
    report.model = lm.name
    print(report.table())
    if val is not None:
        report.accuracy["float"] = evaluate(lm.model, val.x, val.y, progress=not args.quiet, desc="eval float")
        report.accuracy["quantized"] = evaluate(qgm, val.x, val.y, progress=not args.quiet, desc="eval quantized")
        print(_accuracy_line("float", report.accuracy["float"]))
        print(
            _accuracy_line(
                f"W{args.weight_bits}A{args.act_bits}", report.accuracy["quantized"], report.accuracy["float"]
            )
        )
    save_quantized(args.out, qgm, report, lm.preprocess)
    print(f"wrote {Path(args.out) / MODEL_FILE} and {Path(args.out) / REPORT_FILE}")


def cmd_eval(args) -> None:
    if Path(args.model).is_dir():
        model, pre = load_quantized(args.model)
        name = str(args.model)
    else:
        lm = load_model(args.model, args.weights, args.random_weights)
        model, pre, name = lm.model, lm.preprocess, lm.name
    val = load_images(args.val, pre, args.num_val, labeled=True, progress=not args.quiet)
    print(_accuracy_line(name, evaluate(model, val.x, val.y, progress=not args.quiet)))


def cmd_compare(args) -> None:
    """The main job: float vs RTN at each weight width on the same calibration and val images."""
    configs = {wb: _config(args, wb) for wb in args.weight_bits}  # bad options fail before any image is read
    lm, calib, val = _load(args)
    results = {"float": evaluate(lm.model, val.x, val.y, progress=not args.quiet, desc="eval float")}
    reports = {}
    for wb in args.weight_bits:
        name = f"W{wb}A{args.act_bits} {args.method}"
        t0 = time.perf_counter()
        qgm, rep = quantize(lm.model, batches(calib.x, args.batch_size), configs[wb])
        seconds = time.perf_counter() - t0
        results[name] = {
            **evaluate(qgm, val.x, val.y, progress=not args.quiet, desc=f"eval {name}"),
            "quantize_seconds": seconds,
        }
        reports[name] = rep.to_dict()
    print(f"\n{lm.name}: calibration on {len(calib)} images of {args.calib}; top-1 on {len(val)} images of {args.val}")
    for name, acc in results.items():
        print(_accuracy_line(name, acc, None if name == "float" else results["float"]))
    write_json_atomic(str(Path(args.out) / "compare.json"), {"model": lm.name, "results": results, "reports": reports})
    print(f"wrote {Path(args.out) / 'compare.json'}")


def cmd_lfh(args) -> None:
    """Label-free Hessian traces of every interest tensor: table, JSON and a bar chart."""
    from fxq.plots import lfh_bar_chart

    cfg = LFHConfig(
        min_probes=args.min_probes,
        max_probes=args.max_probes,
        rel_tol=args.rel_tol,
        probe=args.probe,
        images=args.num_calib or 32,
        batch_size=args.batch_size,
        probes_per_pass=args.probes_per_pass,
        seed=args.seed,
    )
    lm = load_model(args.model, args.weights, args.random_weights)
    images = load_images(args.calib, lm.preprocess, cfg.images, progress=not args.quiet)
    ptq = PTQConfig(frontend=args.frontend, progress=not args.quiet)
    _, report = label_free_hessian(lm.model, [images.x], cfg, ptq)
    report.model = lm.name
    rows = [lr for lr in report.layers if lr.interest]
    print(f"{'interest tensor':<32} {'kind':<7} {'LFH trace':>11} {'std err':>10} {'weight':>7}")
    for lr in rows:
        print(f"{lr.node:<32} {lr.kind:<7} {lr.lfh:11.4g} {lr.lfh_stderr:10.3g} {lr.lfh_weight:7.3f}")
    print(f"{len(rows)} interest tensors, {len(images)} images, LFH {report.stage_seconds['LFH']:.1f} s")
    out = Path(args.out)
    write_json_atomic(str(out / "lfh.json"), report.to_dict())
    lfh_bar_chart(report, str(out / "lfh.png"))
    print(f"wrote {out / 'lfh.json'} and {out / 'lfh.png'}")


def cmd_export(args) -> None:
    """A folder written by `fxq quantize` -> ONNX QDQ (ONNX Runtime) or a torch.export program (.pt2)."""
    model, pre = load_quantized(args.model)
    example = torch.randn(2, 3, pre.crop, pre.crop)  # batch 2: torch.export would specialise a batch of 1
    if args.format == "onnx":
        from fxq.onnx_export import export_onnx

        export_onnx(model, (example,), args.out)
    else:
        ep = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},), strict=False)
        tmp = f"{args.out}.tmp.pt2"  # torch.export.save wants the .pt2 suffix
        torch.export.save(ep, tmp)
        os.replace(tmp, args.out)
    print(f"wrote {args.out}")


def cmd_bench(args) -> None:
    """Float vs quantized latency per backend at each batch size, timed in the same run."""
    from fxq.latency import backend_latencies

    cfg = _config(args, args.weight_bits)
    lm = load_model(args.model, args.weights, args.random_weights)
    calib = load_images(args.calib, lm.preprocess, args.num_calib, progress=not args.quiet)
    qgm, _ = quantize(lm.model, batches(calib.x, args.batch_size), cfg)
    rows = backend_latencies(lm.model, qgm, lm.preprocess.crop, args.batch_sizes, args.iters, args.backends)
    print(f"{lm.name} W{args.weight_bits}A{args.act_bits}, {torch.get_num_threads()} threads, median of {args.iters}")
    print(f"{'backend':<30} {'batch':>5} {'float ms':>10} {'int8 ms':>10} {'speed-up':>9} {'vs eager fp32':>14}")
    for r in rows:
        print(
            f"{r['backend']:<30} {r['batch']:>5} {r['float_ms']:10.2f} {r['int8_ms']:10.2f} {r['speedup']:8.2f}x "
            f"{r['eager_fp32_ms'] / r['int8_ms']:13.2f}x"
        )
    if args.out:
        write_json_atomic(args.out, {"model": lm.name, "threads": torch.get_num_threads(), "rows": rows})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxq", description="post-training quantization of PyTorch models (torch.fx)")
    sub = p.add_subparsers(dest="cmd", required=True)

    qp = sub.add_parser("quantize", help="quantize a model, evaluate it, write model.pt + report.json")
    _model_args(qp), _data_args(qp), _quant_args(qp)
    qp.add_argument("--weight-bits", type=int, default=8)
    qp.add_argument("--out", required=True, help="output folder")
    qp.add_argument("--no-eval", action="store_true", help="skip the float/quantized evaluation")
    qp.set_defaults(fn=cmd_quantize)

    ep = sub.add_parser("eval", help="top-1/top-5 of a quantized folder or a float model")
    ep.add_argument("--model", default=DEFAULT_MODEL, help="a folder written by `fxq quantize`, or a model name")
    ep.add_argument("--weights", default=None)
    ep.add_argument("--random-weights", action="store_true")
    ep.add_argument("--val", default=str(default_data_dir() / "imagenet" / "val"))
    ep.add_argument("--num-val", type=int, default=None)
    ep.add_argument("--quiet", action="store_true")
    ep.set_defaults(fn=cmd_eval)

    cp = sub.add_parser("compare", help="float vs quantized at several weight widths (the README's main job)")
    _model_args(cp), _data_args(cp), _quant_args(cp)
    cp.add_argument(
        "--weight-bits",
        type=lambda s: [int(b) for b in s.split(",")],
        default=[8, 4],
        help="comma-separated weight widths, e.g. 8,4",
    )
    cp.add_argument("--out", default="runs/compare")
    cp.set_defaults(fn=cmd_compare)

    lp = sub.add_parser("lfh", help="label-free Hessian trace of every interest tensor (table, JSON, PNG)")
    _model_args(lp), _data_args(lp)
    lp.add_argument("--frontend", default=Frontend.FX.value, choices=[f.value for f in Frontend])
    lp.add_argument("--min-probes", type=int, default=10)
    lp.add_argument("--max-probes", type=int, default=100)
    lp.add_argument("--rel-tol", type=float, default=1e-3)
    lp.add_argument("--probe", default=Probe.GAUSSIAN.value, choices=[p.value for p in Probe])
    lp.add_argument("--probes-per-pass", type=int, default=1)
    lp.add_argument("--seed", type=int, default=0)
    lp.add_argument("--out", default="runs/lfh")
    lp.set_defaults(fn=cmd_lfh, num_calib=None)

    xp = sub.add_parser("export", help="export a quantized folder: ONNX QDQ for ONNX Runtime, or .pt2 (torch.export)")
    xp.add_argument("--model", required=True, help="a folder written by `fxq quantize`")
    xp.add_argument("--format", choices=["onnx", "pt2"], default="onnx")
    xp.add_argument("--out", required=True, help="output file")
    xp.set_defaults(fn=cmd_export)

    bp = sub.add_parser("bench", help="float vs quantized latency per backend (eager, ONNX Runtime)")
    _model_args(bp), _data_args(bp), _quant_args(bp)
    bp.add_argument("--weight-bits", type=int, default=8)
    bp.add_argument("--batch-sizes", type=lambda s: [int(b) for b in s.split(",")], default=[1, 32])
    bp.add_argument("--iters", type=int, default=20)
    bp.add_argument(
        "--backends",
        type=lambda s: s.split(","),
        default=list(BACKENDS),
        help=f"comma-separated, from {','.join(BACKENDS)}",
    )
    bp.add_argument("--out", default=None, help="also write the rows as JSON")
    bp.set_defaults(fn=cmd_bench, num_calib=32)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except FxqError as e:
        print(f"fxq: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
