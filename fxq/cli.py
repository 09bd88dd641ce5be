"""The `fxq` command line, over the same API as Python users call."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from fxq.backends.check import CheckLimits
from fxq.backends.latency import BACKENDS
from fxq.config import (
    ActThreshold,
    LFHConfig,
    LossWeights,
    Method,
    MixedPrecisionConfig,
    Probe,
    PTQConfig,
    RoundingConfig,
    WeightError,
    measure_fields,
)
from fxq.data import ImageSet, Preprocess, batches, load_images
from fxq.errors import ConfigError, FxqError, ModelError
from fxq.evaluate import evaluate
from fxq.frontend import Frontend
from fxq.meta import without_graph_state
from fxq.models import DEFAULT_MODEL, LoadedModel, default_image_sets, load_model
from fxq.ops import pick_device, set_eval_
from fxq.pipeline import label_free_hessian, quantize
from fxq.report import Report, write_json_atomic
from fxq.targets import INT8, ISA, cpu_description, isa_named

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
    folder = Path(folder)
    if not (folder / MODEL_FILE).is_file():
        raise ModelError(f"'{folder}' holds no {MODEL_FILE}; give a folder written by `fxq quantize --out`")
    model = torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=False)
    p = _saved_report(folder).get("preprocess")
    pre = Preprocess(p["resize"], p["crop"], tuple(p["mean"]), tuple(p["std"])) if p else Preprocess()
    return set_eval_(model), pre


def _saved_report(folder: Path) -> dict:
    """The report.json `fxq quantize --out` wrote beside model.pt, or {} when there is none."""
    path = folder / REPORT_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _fill_image_sets(args) -> None:
    """--calib/--val left out: the shared sets of the model named (of a quantized folder: the model its report
    names), so that a CIFAR-10 model is not calibrated and scored on ImageNet images."""
    missing = [k for k in ("calib", "val") if k in vars(args) and vars(args)[k] is None]
    if not missing:
        return
    name = args.model
    if Path(name).is_dir():
        name = _saved_report(Path(name)).get("model") or DEFAULT_MODEL
    sets = dict(zip(("calib", "val"), default_image_sets(name)))
    for k in missing:
        setattr(args, k, str(sets[k]))


_SHARED_SETS = "default: the shared set for the model, ImageNet's or CIFAR-10's"


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--calib", default=None, help=f"calibration images, a folder or .npz; labels unused ({_SHARED_SETS})"
    )
    p.add_argument("--val", default=None, help=f"labeled images: a folder with labels.tsv, or .npz ({_SHARED_SETS})")
    p.add_argument("--num-calib", type=int, default=None, help="use the first N calibration images (default all)")
    p.add_argument("--num-val", type=int, default=None, help="evaluate on the first N val images (default all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name (default {DEFAULT_MODEL}) or torchvision name")
    p.add_argument("--weights", default=None, help="state-dict file for the model")
    p.add_argument("--random-weights", action="store_true", help="torchvision model with random weights (speed runs)")


def _target_arg(p: argparse.ArgumentParser, default: str | None = "host") -> None:
    p.add_argument(
        "--target",
        default=default,
        choices=["host", *(i.value for i in ISA)],
        help="the integer dot product of the device the model is for: host (this machine's, detected), x86-vnni, "
        "x86-avx2 (x86 without VNNI: 8-bit weights of layers that sum over channels take a 7-bit grid, which its "
        "u8 x s8 kernels compute exactly), arm64 or generic" + ("" if default else " (default: the model's own)"),
    )


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (the GPU when there is one)")


def _quant_args(p: argparse.ArgumentParser) -> None:
    _mp_args(p)
    _target_arg(p)
    p.add_argument("--act-bits", type=int, default=8)
    p.add_argument("--method", default=Method.RTN.value, choices=[m.value for m in Method])
    p.add_argument("--act-threshold", default=ActThreshold.MSE.value, choices=[a.value for a in ActThreshold])
    p.add_argument(
        "--weight-error",
        default=WeightError.MSE.value,
        choices=[e.value for e in WeightError],
        help="what a weight threshold minimises: the weight's error (mse) or the layer output's (output)",
    )
    p.add_argument("--frontend", default=Frontend.FX.value, choices=[f.value for f in Frontend])
    p.add_argument("--no-bias-correction", action="store_true")
    r = p.add_argument_group("EPTQ rounding (--method eptq)")
    r.add_argument(
        "--schedule",
        choices=["auto", "short", "full"],
        default="auto",
        help="full: 20K iterations of 32 images (the paper's); short: 400 of 8, minutes on a CPU; "
        "auto: full on a GPU, short on a CPU",
    )
    r.add_argument("--iterations", type=int, default=None, help="override the schedule's iteration count")
    r.add_argument("--rounding-batch", type=int, default=None, help="override the schedule's batch size")
    r.add_argument("--rounding-images", type=int, default=None, help="use the first N calibration images")
    r.add_argument("--loss-weights", default=LossWeights.LFH.value, choices=[w.value for w in LossWeights])
    r.add_argument("--no-bias-training", action="store_true")
    r.add_argument("--lfh-probes", type=int, default=None, help="max Hutchinson probes (default: 100 full, 16 short)")
    r.add_argument("--checkpoint-dir", default=None, help="checkpoint the rounding here every 500 iterations")
    r.add_argument("--resume", action="store_true", help="continue the rounding from --checkpoint-dir")


_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def _size(text: str) -> float:
    """'2.5MB' -> 2.5e6 bytes (KB/MB/GB decimal, KiB/MiB/GiB binary, a bare number is bytes)."""
    t = text.strip().lower()
    unit = next((u for u in sorted(_UNITS, key=len, reverse=True) if t.endswith(u)), "")
    try:
        return float(t[: len(t) - len(unit)]) * _UNITS.get(unit, 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: write e.g. 2.5MB, 800KB or 1.5MiB") from None


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(b) for b in text.split(","))


def _floats(text: str) -> list[float]:
    return [float(b) for b in text.split(",")]


def _mp_args(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("mixed precision (per-layer weight widths from an ILP; give a budget)")
    m.add_argument("--weight-memory", type=_size, default=None, help="quantized weight budget, e.g. 2.5MB")
    m.add_argument("--avg-bits", type=float, default=None, help="budget as average bits per weight, e.g. 3.5")
    m.add_argument("--bops", type=float, default=None, help="budget in bit-operations (MACs x W bits x A bits)")
    m.add_argument("--bit-options", type=_ints, default=None, help="widths to choose from (default 2,4,8)")
    m.add_argument("--act-bit-options", type=_ints, default=None, help="activations choose a width too, e.g. 4,8")
    m.add_argument("--act-avg-bits", type=float, default=None, help="activation budget: average bits per value")
    m.add_argument("--mp-images", type=int, default=32, help="calibration images for the sensitivities")
    m.add_argument(
        "--mp-loss-weights",
        type=_measures,
        default=None,
        help="sensitivity: lfh (LFH-weighted interest tensors), mean (their plain mean, MCT's AVG) or output (the "
        "model output alone); a list such as lfh,output solves the ILP under each and keeps the allocation whose "
        "RTN model agrees most with the float model on held-out calibration images. Default: lfh,output for a "
        "model returning class scores, else lfh; one measure alone turns the choice off",
    )
    m.add_argument("--mp-check-images", type=int, default=256, help="held-out images for that agreement check")


def _measures(text: str) -> dict:
    try:
        return measure_fields(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _mixed_precision(args, **budget) -> MixedPrecisionConfig | None:
    given = {
        "weight_memory": args.weight_memory,
        "avg_bits": args.avg_bits,
        "bops": args.bops,
        "act_avg_bits": args.act_avg_bits,
        **budget,
    }
    if all(v is None for v in given.values()):
        return None
    options = {"bit_options": args.bit_options} if args.bit_options else {}
    if args.act_bit_options:
        options["act_bit_options"] = args.act_bit_options
    options.update(args.mp_loss_weights or {})
    return MixedPrecisionConfig(**given, **options, images=args.mp_images, check_images=args.mp_check_images)


def _schedule(args) -> tuple[str, RoundingConfig, LFHConfig]:
    """The rounding and LFH settings the flags ask for; 'auto' is full on a GPU, short on a CPU."""
    on_gpu = pick_device(args.device).type == "cuda"
    name = args.schedule if args.schedule != "auto" else ("full" if on_gpu else "short")
    overrides = {
        k: v
        for k, v in {
            "iterations": args.iterations,
            "batch_size": args.rounding_batch,
            "images": args.rounding_images,
            "checkpoint_dir": args.checkpoint_dir,
        }.items()
        if v is not None
    }
    overrides.update(loss_weights=args.loss_weights, train_bias=not args.no_bias_training, resume=args.resume)
    rounding = RoundingConfig.short(**overrides) if name == "short" else RoundingConfig(**overrides)
    probes = args.lfh_probes or (16 if name == "short" else 100)
    return name, rounding, LFHConfig(min_probes=min(10, probes), max_probes=probes)


def _config(args, weight_bits: int, method: str | None = None, mixed: MixedPrecisionConfig | None = None) -> PTQConfig:
    _, rounding, lfh = _schedule(args)
    return PTQConfig(
        mixed_precision=mixed or _mixed_precision(args),
        target=INT8.with_bits(weight_bits, args.act_bits).for_isa(args.target),
        method=method or args.method,
        act_threshold=args.act_threshold,
        weight_error=args.weight_error,
        frontend=args.frontend,
        bias_correction=not args.no_bias_correction,
        rounding=rounding,
        lfh=lfh,
        progress=not args.quiet,
    )


def _say_schedule(args, methods) -> None:
    if Method.EPTQ.value in methods:
        name, r, lfh = _schedule(args)
        note = " (the CPU one; --schedule full for the paper's 20K x 32)" if name == "short" else ""
        print(
            f"EPTQ schedule: {name}{note}: {r.iterations} iterations, batch {r.batch_size}, "
            f"LFH up to {lfh.max_probes} probes",
            flush=True,
        )


def _model(args) -> LoadedModel:
    """The model the flags name, on the device they name (the passes and the data follow its parameters)."""
    lm = load_model(args.model, args.weights, args.random_weights)
    lm.model.to(pick_device(args.device))
    return lm


def _load(args) -> tuple[LoadedModel, ImageSet, ImageSet | None]:
    lm = _model(args)
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
    _say_schedule(args, [args.method])
    lm, calib, val = _load(args)
    t0 = time.perf_counter()
    qgm, report = quantize(lm.model, batches(calib.x, args.batch_size), cfg)
    report.stage_seconds["total_quantize"] = time.perf_counter() - t0
    report.model = lm.name
    print(report.table())
    if report.mixed_precision:
        print(_mp_line(report))
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


def _mp_line(report: Report) -> str:
    m = report.mixed_precision
    counts = {b: list(m["bits"].values()).count(b) for b in m["options"]}
    return (
        f"mixed precision: {m['avg_bits']:.3f} bits/weight, {m['weight_bytes'] / 1e6:.3f} MB of weights "
        f"({', '.join(f'{n} layers at {b} bits' for b, n in counts.items() if n)}); sensitivity "
        f"{report.stage_seconds.get('Sensitivity', 0):.1f} s, ILP {m['solve_seconds'] * 1e3:.0f} ms"
        + (f"; activations {m['act_avg_bits']:.3f} bits/value" if "act_bits" in m else "")
        + (_selection(m) if "selected" in m else "")
    )


def _selection(m: dict) -> str:
    scores = ", ".join(f"{k} {v:.1f} %" for k, v in m["agreement"].items())
    return f"; measure {m['selected']} kept (agreement with float on {m['check_images']} calib images: {scores})"


def cmd_pareto(args) -> None:
    """Accuracy against weight memory: mixed precision over a sweep of budgets, uniform widths for reference."""
    from fxq.meta import copy_graph
    from fxq.pipeline import allocation_passes, analyze, quantize_analyzed, run_passes
    from fxq.plots import pareto_plot

    sweep = {b: _config(args, max(args.uniform), mixed=_mixed_precision(args, avg_bits=b)) for b in args.avg_bits_list}
    uniform = {b: _config(args, b, mixed=None) for b in args.uniform}
    _say_schedule(args, [args.method])
    lm, calib, val = _load(args)
    xs = batches(calib.x, args.batch_size)
    rows = [{"kind": "float", "label": "float", **evaluate(lm.model, val.x, val.y, progress=False)}]
    first = next(iter(sweep.values()))
    analyzed = analyze(lm.model, xs, first)  # LFH, sensitivities and calibration once, for every budget
    for avg, cfg in sweep.items():
        gm = run_passes(copy_graph(analyzed), allocation_passes(cfg, xs))
        qgm, rep = quantize_analyzed(gm, xs, cfg, lm.name)
        acc = evaluate(qgm, val.x, val.y, progress=False)
        m = rep.mixed_precision
        rows.append(
            {
                "kind": "mixed",
                "label": f"MP {avg} b/w",
                "budget_avg_bits": avg,
                **acc,
                "avg_bits": m["avg_bits"],
                "weight_mb": m["weight_bytes"] / 1e6,
                "bits": m["bits"],
            }
        )
        print(
            f"mixed {avg:>4} bits/weight: top-1 {acc['top1']:6.2f}  ({m['avg_bits']:.3f} b/w, {m['weight_bytes'] / 1e6:.3f} MB)"
        )
    for b, cfg in uniform.items():
        qgm, rep = quantize(lm.model, xs, cfg)
        numel = sum(math.prod(lr.weight_shape) for lr in rep.layers if lr.weight_bits)
        acc = evaluate(qgm, val.x, val.y, progress=False)
        rows.append({"kind": "uniform", "label": f"W{b}", "avg_bits": b, "weight_mb": numel * b / 8e6, **acc})
        print(f"uniform W{b}: top-1 {acc['top1']:6.2f}  ({numel * b / 8e6:.3f} MB)")
    out = Path(args.out)
    sens = analyzed.meta["fxq"].stage_seconds.get("Sensitivity", 0.0)
    write_json_atomic(
        str(out / "pareto.json"), {"model": lm.name, "method": args.method, "sensitivity_seconds": sens, "rows": rows}
    )
    pareto_plot(
        rows, str(out / "pareto.png"), f"{lm.name} {args.method}: top-1 vs weight memory ({len(val)} val images)"
    )
    print(f"wrote {out / 'pareto.json'} and {out / 'pareto.png'}")


def cmd_eval(args) -> None:
    if Path(args.model).is_dir():
        model, pre = load_quantized(args.model)
        name = str(args.model)
    else:
        lm = load_model(args.model, args.weights, args.random_weights)
        model, pre, name = lm.model, lm.preprocess, lm.name
    model.to(pick_device(args.device))
    val = load_images(args.val, pre, args.num_val, labeled=True, progress=not args.quiet)
    print(_accuracy_line(name, evaluate(model, val.x, val.y, progress=not args.quiet)))


def _runs(text: str) -> list[tuple[str, int]]:
    """'rtn:8,rtn:4,eptq:4' -> [('rtn', 8), ('rtn', 4), ('eptq', 4)]."""
    runs = []
    for item in text.split(","):
        method, _, bits = item.strip().partition(":")
        if method not in [m.value for m in Method] or not bits.isdigit():
            raise argparse.ArgumentTypeError(
                f"bad run {item!r}: write METHOD:WEIGHT_BITS with METHOD in {[m.value for m in Method]}, e.g. eptq:4"
            )
        runs.append((method, int(bits)))
    return runs


def cmd_compare(args) -> None:
    """The main job: float vs each (method, weight width) run on the same calibration and val images."""
    configs = {run: _config(args, run[1], run[0]) for run in args.runs}  # bad options fail before any image is read
    _say_schedule(args, [m for m, _ in args.runs])
    lm, calib, val = _load(args)
    results = {"float": evaluate(lm.model, val.x, val.y, progress=not args.quiet, desc="eval float")}
    reports = {}
    for method, wb in args.runs:
        name = f"W{wb}A{args.act_bits} {method}"
        t0 = time.perf_counter()
        qgm, rep = quantize(lm.model, batches(calib.x, args.batch_size), configs[(method, wb)])
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
    lm = _model(args)
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
    """A folder written by `fxq quantize` -> ONNX QDQ (ONNX Runtime), a torch.export program (.pt2, fake-quant),
    or an AOTInductor package with x86 integer kernels (aoti-int8, .pt2). The integer formats run next to the
    reference on calibration images first; the check and the artifact's sizes go to OUT.json."""
    from fxq.backends.artifact import export_artifact

    model, pre = load_quantized(args.model)
    saved = _saved_report(Path(args.model))
    target = isa_named(args.target) if args.target else ISA(saved["isa"]) if saved.get("isa") else None
    example = torch.randn(2, 3, pre.crop, pre.crop)  # batch 2: torch.export would specialise a batch of 1
    check_inputs = None
    if args.format != "pt2":
        check_inputs = load_images(args.calib, pre, args.check_images, progress=not args.quiet).x
    limits = CheckLimits(images=args.check_images)
    summary = export_artifact(
        model, example, args.out, args.format, target, args.weight_storage, check_inputs, limits, args.force, saved
    )
    if summary.get("check"):
        print(summary["check_line"])
    print(summary["size_line"])
    print(f"wrote {args.out} and {args.out}.json")


def cmd_bench(args) -> None:
    """Float vs quantized latency per backend at each batch size, timed in the same run."""
    from fxq.backends.inductor import int8_inductor_available
    from fxq.backends.latency import backend_latencies

    unknown = set(args.backends or []) - set(BACKENDS)
    if unknown:
        raise ConfigError(f"unknown backend(s) {sorted(unknown)} in --backends; choose from {','.join(BACKENDS)}")
    backends = args.backends or [b for b in BACKENDS if b != "inductor-int8" or int8_inductor_available()]
    cfg = _config(args, args.weight_bits)
    lm = load_model(args.model, args.weights, args.random_weights)
    calib = load_images(args.calib, lm.preprocess, args.num_calib, progress=not args.quiet)
    qgm, _ = quantize(lm.model, batches(calib.x, args.batch_size), cfg)
    rows = backend_latencies(lm.model, qgm, lm.preprocess.crop, args.batch_sizes, args.iters, backends)
    isa = cfg.target.isa
    print(
        f"{lm.name} W{args.weight_bits}A{args.act_bits} for {isa.value} ({isa.form}); this CPU: {cpu_description()}, "
        f"{torch.get_num_threads()} threads, median of {args.iters}"
    )
    print(f"{'backend':<30} {'batch':>5} {'float ms':>10} {'int8 ms':>10} {'speed-up':>9} {'vs eager fp32':>14}")
    for r in rows:
        print(
            f"{r['backend']:<30} {r['batch']:>5} {r['float_ms']:10.2f} {r['int8_ms']:10.2f} {r['speedup']:8.2f}x "
            f"{r['eager_fp32_ms'] / r['int8_ms']:13.2f}x"
        )
    if args.out:
        write_json_atomic(
            args.out,
            {
                "model": lm.name,
                "isa": isa.value,
                "cpu": cpu_description(),
                "threads": torch.get_num_threads(),
                "rows": rows,
            },
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxq", description="post-training quantization of PyTorch models (torch.fx)")
    sub = p.add_subparsers(dest="cmd", required=True)

    qp = sub.add_parser("quantize", help="quantize a model, evaluate it, write model.pt + report.json")
    _model_args(qp), _device_arg(qp), _data_args(qp), _quant_args(qp)
    qp.add_argument("--weight-bits", type=int, default=8)
    qp.add_argument("--out", required=True, help="output folder")
    qp.add_argument("--no-eval", action="store_true", help="skip the float/quantized evaluation")
    qp.set_defaults(fn=cmd_quantize)

    ep = sub.add_parser("eval", help="top-1/top-5 of a quantized folder or a float model")
    ep.add_argument("--model", default=DEFAULT_MODEL, help="a folder written by `fxq quantize`, or a model name")
    ep.add_argument("--weights", default=None)
    ep.add_argument("--random-weights", action="store_true")
    _device_arg(ep)
    ep.add_argument("--val", default=None, help=f"labeled images ({_SHARED_SETS})")
    ep.add_argument("--num-val", type=int, default=None)
    ep.add_argument("--quiet", action="store_true")
    ep.set_defaults(fn=cmd_eval)

    cp = sub.add_parser("compare", help="float vs quantized at several weight widths (the README's main job)")
    _model_args(cp), _device_arg(cp), _data_args(cp), _quant_args(cp)
    cp.add_argument(
        "--runs",
        type=_runs,
        default=_runs("rtn:8,rtn:4,eptq:4"),
        help="comma-separated METHOD:WEIGHT_BITS runs (default rtn:8,rtn:4,eptq:4)",
    )
    cp.add_argument("--out", default="runs/compare")
    cp.set_defaults(fn=cmd_compare)

    pp = sub.add_parser("pareto", help="mixed precision over a sweep of budgets: table, JSON, PNG (top-1 vs size)")
    _model_args(pp), _device_arg(pp), _data_args(pp), _quant_args(pp)
    pp.add_argument("--avg-bits-list", type=_floats, default=[2.5, 3.0, 3.5, 4.0, 5.0, 6.0])
    pp.add_argument("--uniform", type=_ints, default=(2, 4, 8), help="uniform widths to plot for reference")
    pp.add_argument("--out", default="runs/pareto")
    pp.set_defaults(fn=cmd_pareto)

    lp = sub.add_parser("lfh", help="label-free Hessian trace of every interest tensor (table, JSON, PNG)")
    _model_args(lp), _device_arg(lp), _data_args(lp)
    lp.add_argument("--frontend", default=Frontend.FX.value, choices=[f.value for f in Frontend])
    lp.add_argument("--min-probes", type=int, default=10)
    lp.add_argument("--max-probes", type=int, default=100)
    lp.add_argument("--rel-tol", type=float, default=1e-3)
    lp.add_argument("--probe", default=Probe.GAUSSIAN.value, choices=[p.value for p in Probe])
    lp.add_argument("--probes-per-pass", type=int, default=1)
    lp.add_argument("--seed", type=int, default=0)
    lp.add_argument("--out", default="runs/lfh")
    lp.set_defaults(fn=cmd_lfh, num_calib=None)

    xp = sub.add_parser(
        "export", help="export a quantized folder: ONNX QDQ, .pt2 (torch.export), or an int8 AOTInductor package"
    )
    xp.add_argument("--model", required=True, help="a folder written by `fxq quantize`")
    xp.add_argument(
        "--format",
        choices=["onnx", "pt2", "aoti-int8"],
        default="onnx",
        help="onnx: QDQ for ONNX Runtime; pt2: torch.export of the fake-quant graph; aoti-int8: AOTInductor "
        "package with oneDNN integer kernels (x86 CPU, needs torchao), load with torch._inductor.aoti_load_package",
    )
    xp.add_argument("--out", required=True, help="output file (its report goes to OUT.json)")
    _target_arg(xp, default=None)
    xp.add_argument(
        "--weight-storage",
        choices=["packed", "int8"],
        default="packed",
        help="onnx: weights of 4 bits or fewer as INT4 (packed: half the bytes; ONNX Runtime's CPU runs them "
        "dequantized) or every weight as int8 (ONNX Runtime's integer kernels run every layer)",
    )
    xp.add_argument("--calib", default=None, help=f"images the export is checked on ({_SHARED_SETS})")
    xp.add_argument("--check-images", type=int, default=64, help="how many of them (default 64)")
    xp.add_argument("--force", action="store_true", help="write the export even when its check fails")
    xp.add_argument("--quiet", action="store_true")
    xp.set_defaults(fn=cmd_export)

    bp = sub.add_parser("bench", help="float vs quantized latency per backend (eager, ONNX Runtime, Inductor)")
    _model_args(bp), _data_args(bp), _quant_args(bp)
    bp.add_argument("--weight-bits", type=int, default=8)
    bp.add_argument("--batch-sizes", type=lambda s: [int(b) for b in s.split(",")], default=[1, 32])
    bp.add_argument("--iters", type=int, default=20)
    bp.add_argument(
        "--backends",
        type=lambda s: s.split(","),
        default=None,
        help=f"comma-separated, from {','.join(BACKENDS)} (default: all; inductor-int8 where torchao is installed)",
    )
    bp.add_argument("--out", default=None, help="also write the rows as JSON")
    bp.set_defaults(fn=cmd_bench, num_calib=32, device="cpu")  # the backends it times are CPU ones
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _fill_image_sets(args)
        args.fn(args)
    except FxqError as e:
        print(f"fxq: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
