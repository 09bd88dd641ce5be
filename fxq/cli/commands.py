"""The `fxq` commands: each a thin sequence of API calls, printing through fxq.cli.render."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from fxq.backends.check import CheckLimits
from fxq.backends.latency import BACKENDS
from fxq.cli.options import (
    fill_image_sets,
    loaded_model,
    mixed_precision_config,
    model_and_images,
    ptq_config,
    rounding_schedule,
    subset,
)
from fxq.cli.parser import build_parser
from fxq.cli.render import accuracy_line, bench_table, mp_line
from fxq.config import LFHConfig, Method, PTQConfig, Start
from fxq.data.evaluate import evaluate
from fxq.data.images import batches, check_image_source, load_images
from fxq.data.models import load_model
from fxq.dist.launch import join, launch, launched
from fxq.dist.world import World
from fxq.eptq.train import CHECKPOINT, check_resumable
from fxq.errors import ConfigError, FxqError, RankLost
from fxq.io import artifact
from fxq.io.artifact import saved_model_name
from fxq.io.files import (
    check_output_file,
    check_output_folder,
    os_error_message,
    result_folder,
    write_json_atomic,
)
from fxq.ir.meta import gq
from fxq.ir.ops import pick_device
from fxq.memory import keep_freed_memory
from fxq.pipeline import label_free_hessian, quantize
from fxq.targets import ISA, CpuClock, cpu_description, isa_named

__all__ = ["main", "COMMANDS"]

STOLEN_NOTICE = 0.1  # of the machine's CPU time taken by other guests during a run, above which the run says so


def _say_schedule(args, methods) -> None:
    if Method.EPTQ.value in methods:
        name, r, lfh = rounding_schedule(args)
        note = " (the CPU one; --schedule full for the paper's 20K x 32)" if name == "short" else ""
        budget = getattr(args, "time_budget", None)
        length = f"up to {r.iterations} iterations" if budget else f"{r.iterations} iterations"
        frozen = f", the first layers (up to {r.frozen_share:.0%} of the weights) kept there" if r.frozen_share else ""
        start = f", from the layer-local start{frozen}"
        print(
            f"EPTQ schedule: {name}{note}: {length}, batch {r.batch_size}, LFH up to {lfh.max_probes} probes"
            + (start if r.start is Start.LAYERWISE else "")
            + (f"; planned to end within {budget:.0f} s of wall time (evaluation not counted)" if budget else ""),
            flush=True,
        )


def cmd_quantize(args) -> None:
    cfg = ptq_config(args, args.weight_bits)  # bad options fail before any image is read
    _say_schedule(args, [args.method])
    t_load = time.monotonic()
    lm, calib, val = model_and_images(args)
    if cfg.time_budget is not None:  # the budget counts the loading too
        cfg = dataclasses.replace(cfg, time_budget=max(cfg.time_budget - (time.monotonic() - t_load), 1e-3))
    clock = CpuClock()
    qgm, report = quantize(lm.model, batches(calib.x, args.batch_size), cfg)
    spent = clock.read()
    report.stage_seconds["total_quantize"] = spent["wall_seconds"]
    if spent["stolen_share"] is not None and spent["stolen_share"] > STOLEN_NOTICE:
        print(
            f"note: other guests of this virtual machine's host took {spent['stolen_share']:.0%} of its CPU time "
            f"during the run ({spent['cpu_seconds']:.0f} CPU s in {spent['wall_seconds']:.0f} s): timings, and the "
            "steps a time budget buys, are the host's load as much as this run's",
            flush=True,
        )
    report.model = lm.name
    report.images = {"calibration": calib.chosen, **({"val": val.chosen} if val is not None else {})}
    print(report.table())
    if report.mixed_precision:
        print(mp_line(report))
    world = World.current()
    if val is not None:
        show = not args.quiet
        report.accuracy["float"] = evaluate(lm.model, val.x, val.y, progress=show, desc="eval float", world=world)
        report.accuracy["quantized"] = evaluate(qgm, val.x, val.y, progress=show, desc="eval quantized", world=world)
        print(accuracy_line("float", report.accuracy["float"]))
        print(
            accuracy_line(
                f"W{args.weight_bits}A{args.act_bits}", report.accuracy["quantized"], report.accuracy["float"]
            )
        )
    if world.main:  # one rank writes; the others wait until it has
        out = artifact.save(qgm, args.out, model_name=lm.name, preprocess=lm.preprocess, report=report)
        print(f"wrote {out / artifact.MODEL_FILE}, {out / artifact.TENSORS_FILE} and {out / artifact.REPORT_FILE}")
    world.barrier("the end of the run")


def cmd_pareto(args) -> None:
    """Accuracy against weight memory: mixed precision over a sweep of budgets, uniform widths for reference."""
    from fxq.io.plots import pareto_plot
    from fxq.pipeline import allocate, analyze, quantize_analyzed

    sweep = {
        b: ptq_config(args, max(args.uniform), mixed=mixed_precision_config(args, avg_bits=b))
        for b in args.avg_bits_list
    }
    uniform = {b: ptq_config(args, b, mixed=None) for b in args.uniform}
    _say_schedule(args, [args.method])
    lm, calib, val = model_and_images(args)
    xs = batches(calib.x, args.batch_size)
    rows = [{"kind": "float", "label": "float", **evaluate(lm.model, val.x, val.y, progress=False)}]
    first = next(iter(sweep.values()))
    analyzed = analyze(lm.model, xs, first)  # LFH, sensitivities and calibration once, for every budget
    for avg, cfg in sweep.items():
        gm = allocate(analyzed, xs, cfg)
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
    summary = {"model": lm.name, "method": args.method, "sensitivity_seconds": sens, "images": _chosen(calib, val)}
    with result_folder(out) as tmp:
        (tmp / "pareto.json").write_text(json.dumps({**summary, "rows": rows}, indent=2))
        title = f"{lm.name} {args.method}: top-1 vs weight memory ({len(val)} val images)"
        pareto_plot(rows, str(tmp / "pareto.png"), title)
    print(f"wrote {out / 'pareto.json'} and {out / 'pareto.png'}")


def cmd_eval(args) -> None:
    if Path(args.model).is_dir():
        saved = artifact.load(args.model)
        model, pre = saved.model, saved.preprocess
        name = str(args.model)
    else:
        lm = load_model(args.model, args.weights, args.random_weights)
        model, pre, name = lm.model, lm.preprocess, lm.name
    model.to(pick_device(args.device))
    val = load_images(args.val, pre, subset(args, args.num_val), labeled=True, progress=not args.quiet)
    print(accuracy_line(name, evaluate(model, val.x, val.y, progress=not args.quiet)))


def cmd_compare(args) -> None:
    """The main job: float vs each (method, weight width) run on the same calibration and val images."""
    configs = {run: ptq_config(args, run[1], run[0]) for run in args.runs}  # bad options fail before any image is read
    _say_schedule(args, [m for m, _ in args.runs])
    lm, calib, val = model_and_images(args)
    world, show = World.current(), not args.quiet
    results = {"float": evaluate(lm.model, val.x, val.y, progress=show, desc="eval float", world=world)}
    reports = {}
    for method, wb in args.runs:
        name = f"W{wb}A{args.act_bits} {method}"
        t0 = time.perf_counter()
        qgm, rep = quantize(lm.model, batches(calib.x, args.batch_size), configs[(method, wb)])
        seconds = time.perf_counter() - t0
        results[name] = {
            **evaluate(qgm, val.x, val.y, progress=show, desc=f"eval {name}", world=world),
            "quantize_seconds": seconds,
        }
        reports[name] = rep.to_dict()
    print(f"\n{lm.name}: calibration on {len(calib)} images of {args.calib}; top-1 on {len(val)} images of {args.val}")
    for name, acc in results.items():
        print(accuracy_line(name, acc, None if name == "float" else results["float"]))
    summary = {"model": lm.name, "images": _chosen(calib, val), "results": results, "reports": reports}
    if world.main:  # one rank writes; the others wait until it has
        with result_folder(args.out) as tmp:
            (tmp / "compare.json").write_text(json.dumps(summary, indent=2))
        print(f"wrote {Path(args.out) / 'compare.json'}")
    world.barrier("the end of the run")


def cmd_lfh(args) -> None:
    """Label-free Hessian traces of every interest tensor: table, JSON and a bar chart."""
    from fxq.io.plots import lfh_bar_chart

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
    lm = loaded_model(args)
    images = load_images(args.calib, lm.preprocess, subset(args, cfg.images), progress=not args.quiet)
    ptq = PTQConfig(frontend=args.frontend, progress=not args.quiet)
    _, report = label_free_hessian(lm.model, [images.x], cfg, ptq)
    report.model = lm.name
    rows = [lr for lr in report.layers if lr.interest]
    print(f"{'interest tensor':<32} {'kind':<7} {'LFH trace':>11} {'std err':>10} {'weight':>7}")
    for lr in rows:
        print(f"{lr.node:<32} {lr.kind:<7} {lr.lfh:11.4g} {lr.lfh_stderr:10.3g} {lr.lfh_weight:7.3f}")
    print(f"{len(rows)} interest tensors, {len(images)} images, LFH {report.stage_seconds['LFH']:.1f} s")
    out = Path(args.out)
    report.images = {"calibration": images.chosen}
    with result_folder(out) as tmp:
        (tmp / "lfh.json").write_text(json.dumps(report.to_dict(), indent=2))
        lfh_bar_chart(report, str(tmp / "lfh.png"))
    print(f"wrote {out / 'lfh.json'} and {out / 'lfh.png'}")


def cmd_export(args) -> None:
    """A folder written by `fxq quantize` -> ONNX QDQ (ONNX Runtime), a torch.export program (.pt2, fake-quant),
    or an AOTInductor package with x86 integer kernels (aoti-int8, .pt2). The integer formats run next to the
    reference on calibration images first; the check and the artifact's sizes go to OUT.json."""
    from fxq.backends.export import export_artifact

    loaded = artifact.load(args.model)
    model, pre, saved = loaded.model, loaded.preprocess, loaded.report
    target = isa_named(args.target) if args.target else ISA(saved["isa"]) if saved.get("isa") else None
    example = torch.randn(2, 3, pre.crop, pre.crop)  # batch 2: torch.export would specialise a batch of 1
    check_inputs = None
    if args.format != "pt2":
        check_inputs = load_images(args.calib, pre, subset(args, args.check_images), progress=not args.quiet).x
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
    from fxq.backends.latency import CPU_ONLY, backend_latencies

    unknown = set(args.backends or []) - set(BACKENDS)
    if unknown:
        raise ConfigError(f"unknown backend(s) {sorted(unknown)} in --backends; choose from {','.join(BACKENDS)}")
    device = pick_device(args.device)
    if args.per_op and device.type == "cuda":
        raise ConfigError("--per-op times the CPU backends' kernels; run it with --device cpu")
    backends = args.backends or [
        b
        for b in BACKENDS
        if (b != "inductor-int8" or int8_inductor_available()) and (device.type == "cpu" or b not in CPU_ONLY)
    ]
    if Path(args.model).is_dir():  # a folder `fxq quantize` wrote: time that model against its float one
        saved = artifact.load(args.model)
        if not saved.model_name:
            raise ConfigError(f"bench: '{args.model}' names no model fxq can build; bench it through the Python API")
        lm = load_model(saved.model_name, args.weights, args.random_weights)
        calib = load_images(args.calib, saved.preprocess, subset(args, args.num_calib), progress=not args.quiet)
        qgm, what = saved.model, f"{args.model} ({saved.model_name})"
    else:
        cfg = ptq_config(args, args.weight_bits)
        lm = load_model(args.model, args.weights, args.random_weights)
        calib = load_images(args.calib, lm.preprocess, subset(args, args.num_calib), progress=not args.quiet)
        qgm, _ = quantize(lm.model.to(device), batches(calib.x, args.batch_size), cfg)
        what = f"{lm.name} W{args.weight_bits}A{args.act_bits}"
    lm.model.to(device)  # a saved model and its float one load on the CPU
    qgm.to(device)
    rows = backend_latencies(lm.model, qgm, lm.preprocess.crop, args.batch_sizes, args.iters, backends, device)
    isa = gq(qgm).target.isa
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(
        f"{what} for {isa.value} ({isa.form}); this CPU: {cpu_description()}, {where}; "
        f"median and interquartile range of {args.iters} calls after 3 warm-up calls"
        + (" (CUDA events)" if device.type == "cuda" else "")
    )
    print(bench_table(rows))
    if args.out:
        write_json_atomic(
            args.out,
            {
                "model": lm.name,
                "isa": isa.value,
                "cpu": cpu_description(),
                "threads": torch.get_num_threads(),
                "device": str(device),
                "rows": rows,
            },
        )
    if args.per_op:
        _bench_per_op(args, lm.name, qgm, calib.x, backends)


def _bench_per_op(args, name: str, qgm, images, backends: list[str]) -> None:
    """Each quantized op alone on each backend at each batch size: table, JSON, CSV and a roofline plot."""
    import csv
    import io

    from fxq.backends.peaks import measure_peaks
    from fxq.backends.per_op import per_op_report, quantized_ops, time_ops, to_rows
    from fxq.io.plots import roofline_plot

    per_op = [{"eager": "reference"}.get(b, b) for b in backends if b != "inductor"]
    peaks = measure_peaks()
    print(
        f"roofs: fp32 GEMM {peaks.fp32_gflops:.1f} GFLOP/s, int8 GEMM {peaks.int8_gops:.1f} GOP/s "
        f"({peaks.int8_kernel}), memory {peaks.bandwidth_gbs:.1f} GB/s"
    )
    reports = {}
    for batch in args.batch_sizes:
        x = images[torch.arange(batch) % len(images)]
        rows = time_ops(quantized_ops(qgm, x), per_op, peaks, gq(qgm).target, args.iters, not args.quiet)
        reports[batch] = per_op_report(name, qgm, rows, peaks, batch)
        print(f"\nper op, batch {batch} (ms, median of {args.iters}; % of the roof at the op's intensity)")
        keys = list(rows[0].ms) if rows else []
        print(f"{'op':<28} {'kind':<6} {'W/A':>5} {'MMACs':>8} " + " ".join(f"{k:>24}" for k in keys))
        for r in rows:
            cells = " ".join(f"{r.ms[k]:9.3f} ({100 * r.peak_fraction[k]:5.1f} %)".rjust(24) for k in keys)
            print(f"{r.node[:28]:<28} {r.kind:<6} {r.weight_bits:>2}/{r.act_bits:<2} {r.macs / 1e6:8.2f} {cells}")
    with result_folder(args.per_op) as tmp:
        for batch, rep in reports.items():
            (tmp / f"per_op_b{batch}.json").write_text(json.dumps(rep, indent=2))
            flat = to_rows(rep)
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=list(flat[0]) if flat else ["node"])
            writer.writeheader()
            writer.writerows(flat)
            (tmp / f"per_op_b{batch}.csv").write_text(buf.getvalue())
            roofline_plot(rep, str(tmp / f"roofline_b{batch}.png"))
    print(f"wrote per-op JSON, CSV and roofline plots to {args.per_op}")


COMMANDS = {
    "quantize": cmd_quantize,
    "eval": cmd_eval,
    "compare": cmd_compare,
    "pareto": cmd_pareto,
    "lfh": cmd_lfh,
    "export": cmd_export,
    "bench": cmd_bench,
}


def _chosen(calib, val) -> dict:
    return {"calibration": calib.chosen, **({"val": val.chosen} if val is not None else {})}


def check_before_work(args) -> None:
    """Everything that can be refused before a model is built or an image decoded: output paths, input paths,
    a resume's checkpoint. Bad option values were refused by the parser already."""
    out = getattr(args, "out", None)
    if not World.current().main:  # another rank writes nothing, and its machine may not even see the outputs
        pass
    elif args.command in ("quantize", "compare", "pareto", "lfh"):
        check_output_folder(out, args.force)
    elif args.command == "export":
        check_output_file(out, args.force)
        check_output_file(f"{out}.json", True, what="the export's report")
    elif args.command == "bench":
        if out:
            check_output_file(out, args.force)
        if args.per_op:
            check_output_folder(args.per_op, args.force, what="--per-op")
    if args.command in ("eval", "export") and Path(args.model).is_dir():
        saved_model_name(args.model)  # a folder that is not fxq's is refused here, by name
    elif args.command == "export":
        raise ConfigError(f"export: --model '{args.model}' is not a folder; give one written by `fxq quantize --out`")
    checked_on_images = not (args.command == "export" and args.format == "pt2")
    for key, labeled in (("calib", False), ("val", True)):
        source = getattr(args, key, None)
        if source is not None and checked_on_images:
            check_image_source(source, labeled)
    if getattr(args, "resume", False) and World.current().main:  # rank 0 reads the checkpoint, sends it on
        _, rounding, _ = rounding_schedule(args)
        check_resumable(rounding)


def _resume_hint(args) -> str:
    where = getattr(args, "checkpoint_dir", None)
    if where and (Path(where) / CHECKPOINT).is_file():
        any_nproc = ", with any --nproc (or none)" if getattr(args, "nproc", None) or launched() else ""
        return f"the checkpoint in '{where}' continues the rounding: run the same command with --resume{any_nproc}"
    if getattr(args, "method", None) == Method.EPTQ.value:
        return "nothing was written; --checkpoint-dir DIR lets a later run continue with --resume"
    return "nothing was written"


def _interrupted(args, signum: int) -> int:
    name = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    print(f"\nfxq: {_rank_prefix()}{name}; {_resume_hint(args)}", file=sys.stderr)
    return 128 + signum


def _rank_prefix() -> str:
    world = World.current()
    return "" if world.solo else f"rank {world.rank}: "


def _start(args, argv: list[str] | None) -> bool:
    """Start the run's processes when --nproc asks for several (True: they ran, here is nothing left to do);
    in a process torchrun started, join its group, and keep the other ranks than 0 quiet."""
    nproc = getattr(args, "nproc", None)
    if nproc and nproc > 1 and not launched():
        fill_image_sets(args)
        check_before_work(args)  # refused once, here, before any process starts
        try:
            launch(sys.argv[1:] if argv is None else argv, nproc)
        except RankLost as e:
            raise RankLost(f"{e}; {_resume_hint(args)}") from None
        return True
    world, device = join(pick_device(args.device)) if hasattr(args, "device") else (World.current(), None)
    if device is not None:
        args.device = str(device)
    if not world.main:  # rank 0 speaks for the run
        args.quiet = True
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    return False


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so the same clean-up as for Ctrl-C runs."""


def main(argv: list[str] | None = None) -> int:
    """The command line: every expected failure is one `fxq: error: ...` line and exit 2; Ctrl-C (SIGINT) exits
    130 and SIGTERM 143, each leaving no partial output; anything else is a bug and keeps its traceback."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a bad command line (one line already printed)
        return e.code if isinstance(e.code, int) else 2

    def on_term(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() else None
    keep_freed_memory()  # a run's buffers are reused, not faulted in again at every step (fxq.memory)
    try:
        if _start(args, argv):
            return 0
        fill_image_sets(args)
        check_before_work(args)
        COMMANDS[args.command](args)
    except FxqError as e:
        prefix = "" if isinstance(e, RankLost) else _rank_prefix()  # a lost rank's message names the ranks
        print(f"fxq: error: {prefix}{e}", file=sys.stderr)
        return 2
    except _Terminated:
        return _interrupted(args, signal.SIGTERM)
    except KeyboardInterrupt:
        return _interrupted(args, signal.SIGINT)
    except OSError as e:  # a file system failure outside fxq's own writers: a device, a network share
        print(f"fxq: error: {os_error_message(e)}", file=sys.stderr)
        return 2
    except MemoryError:
        print(
            "fxq: error: out of memory; use fewer images (--num-calib, --num-val) or a smaller --batch-size",
            file=sys.stderr,
        )
        return 2
    except Exception:
        traceback.print_exc()
        print(
            "fxq: internal error: this is a bug in fxq. Please report it with the command line and the traceback above",
            file=sys.stderr,
        )
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if launched() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
