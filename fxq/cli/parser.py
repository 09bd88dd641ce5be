"""The command line's arguments: one parser per command, and the small value parsers their options use."""

from __future__ import annotations

import argparse
import math
import sys

from fxq.backends.latency import BACKENDS
from fxq.config import ActThreshold, LossWeights, Method, Probe, Start, WeightError, measure_fields
from fxq.data.models import DEFAULT_MODEL
from fxq.eptq.budget import parse_duration
from fxq.errors import ConfigError
from fxq.frontend.trace import Frontend
from fxq.targets import ISA

__all__ = ["build_parser", "SHARED_SETS"]

SHARED_SETS = "default: the shared set for the model, ImageNet's or CIFAR-10's"


def steps_arg(text: str) -> int:
    """An iteration count: an integer >= 0 (0: no whole-network steps, e.g. the layer-local start alone)."""
    return 0 if text.strip() == "0" else count_arg(text)


def count_arg(text: str) -> int:
    """A count: an integer >= 1 (0 and negative counts are refused, never read as 'the default')."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a count: give 1 or more")
    return value


def duration_arg(text: str) -> float:
    """'15m' -> 900.0 seconds (also 900, 900s, 1.5h, 1h30m)."""
    try:
        return parse_duration(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def positive_float_arg(text: str) -> float:
    value = _number(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number above 0")
    return value


def share_arg(text: str) -> float:
    """A share in [0, 1): 0.01 is 1 %."""
    value = _number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a share: give a number from 0 up to (not including) 1")
    return value


def subset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--first",
        action="store_true",
        help="--num-calib/--num-val take the first N images of their set, in file order, instead of N drawn at "
        "random (spread over the classes where labels exist)",
    )
    p.add_argument("--subset-seed", type=int, default=0, help="seed of the random subsets (default 0)")


def data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default=None, help=f"calibration images, a folder or .npz; labels unused ({SHARED_SETS})")
    p.add_argument("--val", default=None, help=f"labeled images: a folder with labels.tsv, or .npz ({SHARED_SETS})")
    p.add_argument(
        "--num-calib", type=count_arg, default=None, help="use N calibration images, drawn at random (default all)"
    )
    p.add_argument(
        "--num-val",
        type=count_arg,
        default=None,
        help="evaluate on N val images, drawn at random over the classes (default all)",
    )
    subset_args(p)
    p.add_argument("--batch-size", type=count_arg, default=32)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def nproc_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nproc",
        type=count_arg,
        default=None,
        help="run as N processes on this machine (torch.distributed, gloo on the CPU, NCCL on GPUs; the images are "
        "shared among them); for several machines start `python -m fxq` with torchrun instead",
    )


def force_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="replace --out if it exists (replaced whole, once complete)")


def model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name (default {DEFAULT_MODEL}) or torchvision name")
    p.add_argument("--weights", default=None, help="state-dict file for the model")
    p.add_argument("--random-weights", action="store_true", help="torchvision model with random weights (speed runs)")


def target_arg(p: argparse.ArgumentParser, default: str | None = "host") -> None:
    p.add_argument(
        "--target",
        default=default,
        choices=["host", *(i.value for i in ISA)],
        help="the integer dot product of the device the model is for: host (this machine's, detected), x86-vnni, "
        "x86-avx2 (x86 without VNNI: 8-bit weights of layers that sum over channels take a 7-bit grid, which its "
        "u8 x s8 kernels compute exactly), arm64 or generic" + ("" if default else " (default: the model's own)"),
    )


def device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (the GPU when there is one)")


def quant_args(p: argparse.ArgumentParser) -> None:
    mp_args(p)
    target_arg(p)
    p.add_argument("--act-bits", type=count_arg, default=8)
    p.add_argument("--method", default=Method.RTN.value, choices=[m.value for m in Method])
    p.add_argument("--act-threshold", default=ActThreshold.MSE.value, choices=[a.value for a in ActThreshold])
    p.add_argument(
        "--weight-error",
        default=WeightError.MSE.value,
        choices=[e.value for e in WeightError],
        help="what a weight threshold minimises: the weight's error (mse) or the layer output's (output)",
    )
    p.add_argument("--frontend", default=Frontend.AUTO.value, choices=[f.value for f in Frontend])
    p.add_argument("--no-bias-correction", action="store_true")
    r = p.add_argument_group("EPTQ rounding (--method eptq)")
    r.add_argument(
        "--schedule",
        choices=["auto", "short", "full"],
        default="auto",
        help="full: 20K iterations of 32 images (the paper's); short: 400 of 8, minutes on a CPU; "
        "auto: full on a GPU, short on a CPU",
    )
    r.add_argument(
        "--iterations",
        type=steps_arg,
        default=None,
        help="override the schedule's iteration count (0 with --start layerwise: the layer-local rounding alone)",
    )
    r.add_argument("--rounding-batch", type=count_arg, default=None, help="override the schedule's batch size")
    r.add_argument(
        "--rounding-images",
        type=count_arg,
        default=None,
        help="optimize on N of the calibration images, drawn at random with the schedule's seed",
    )
    r.add_argument("--loss-weights", default=LossWeights.LFH.value, choices=[w.value for w in LossWeights])
    r.add_argument("--no-bias-training", action="store_true")
    r.add_argument(
        "--start",
        default=Start.FLOAT.value,
        choices=[s.value for s in Start],
        help="where the rounding starts: float (the soft weights at the float weights, EPTQ's) or layerwise (at "
        "each layer's own error-feedback rounding on its cached inputs; fewer steps to the same accuracy)",
    )
    r.add_argument(
        "--frozen-share",
        type=share_arg,
        default=None,
        help="with --start layerwise: the largest share of the weights (default 0.01) that the first layers may "
        "hold and stay at their start, so that the steps skip them (0: every step runs the whole model)",
    )
    r.add_argument(
        "--start-sweeps",
        type=steps_arg,
        default=None,
        help="with --start layerwise: passes of coordinate descent on each layer's error after its error feedback "
        "(each weight moved to its other grid point where that lowers the error; stops when a pass moves none)",
    )
    r.add_argument(
        "--prefix-steps",
        type=steps_arg,
        default=None,
        help="with --start layerwise and a frozen prefix: steps that train the first layers alone, through them "
        "alone, before they freeze (their end's error stands for the rest of the model's)",
    )
    r.add_argument(
        "--act-drop",
        type=share_arg,
        default=None,
        help="QDrop: the share of each activation's elements left float in the rounding's steps (0.5 is QDrop's; "
        "for 4-bit and narrower activations)",
    )
    r.add_argument(
        "--start-sensitivity",
        type=share_arg,
        default=None,
        help="with --start layerwise: the share of each layer's objective that weighs its output positions by the "
        "model output's sensitivity to them (for transformers, whose head reads the class token alone)",
    )
    r.add_argument(
        "--train-act-steps",
        action="store_true",
        help="train every activation quantizer's step beside the rounding (for 4-bit and narrower activations)",
    )
    r.add_argument(
        "--lfh-probes", type=count_arg, default=None, help="max Hutchinson probes (default: 100 full, 16 short)"
    )
    r.add_argument(
        "--time-budget",
        type=duration_arg,
        default=None,
        metavar="DURATION",
        help="wall time for the whole run, e.g. 15m (image loading, calibration, LFH and rounding; not the "
        "evaluation): the rounding's iteration count is planned to end inside it, up to --iterations (default "
        "20K with a budget), at the schedule's batch size",
    )
    r.add_argument("--checkpoint-dir", default=None, help="checkpoint the rounding into this folder")
    r.add_argument(
        "--checkpoint-every", type=count_arg, default=None, help="iterations between checkpoints (default 500)"
    )
    r.add_argument("--resume", action="store_true", help="continue the rounding from --checkpoint-dir")


_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def size_arg(text: str) -> float:
    """'2.5MB' -> 2.5e6 bytes (KB/MB/GB decimal, KiB/MiB/GiB binary, a bare number is bytes)."""
    t = text.strip().lower()
    unit = next((u for u in sorted(_UNITS, key=len, reverse=True) if t.endswith(u)), "")
    try:
        return float(t[: len(t) - len(unit)]) * _UNITS.get(unit, 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: write e.g. 2.5MB, 800KB or 1.5MiB") from None


def ints_arg(text: str) -> tuple[int, ...]:
    """'2,4,8' -> (2, 4, 8): bit widths (the config checks their range)."""
    return tuple(count_arg(b) for b in text.split(","))


def counts_arg(text: str) -> list[int]:
    """'1,32' -> [1, 32]: counts of 1 or more."""
    return [count_arg(b) for b in text.split(",")]


def floats_arg(text: str) -> list[float]:
    return [positive_float_arg(b) for b in text.split(",")]


def mp_args(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("mixed precision (per-layer weight widths from an ILP; give a budget)")
    m.add_argument("--weight-memory", type=size_arg, default=None, help="quantized weight budget, e.g. 2.5MB")
    m.add_argument(
        "--avg-bits", type=positive_float_arg, default=None, help="budget as average bits per weight, e.g. 3.5"
    )
    m.add_argument(
        "--bops", type=positive_float_arg, default=None, help="budget in bit-operations (MACs x W bits x A bits)"
    )
    m.add_argument("--bit-options", type=ints_arg, default=None, help="widths to choose from (default 2,4,8)")
    m.add_argument("--act-bit-options", type=ints_arg, default=None, help="activations choose a width too, e.g. 4,8")
    m.add_argument(
        "--act-avg-bits", type=positive_float_arg, default=None, help="activation budget: average bits per value"
    )
    m.add_argument("--mp-images", type=count_arg, default=32, help="calibration images for the sensitivities")
    m.add_argument(
        "--mp-loss-weights",
        type=measures_arg,
        default=None,
        help="sensitivity: lfh (LFH-weighted interest tensors), mean (their plain mean, MCT's AVG) or output (the "
        "model output alone); a list such as lfh,output solves the ILP under each and keeps the allocation whose "
        "RTN model agrees most with the float model on held-out calibration images. Default: lfh,output for a "
        "model returning class scores, else lfh; one measure alone turns the choice off",
    )
    m.add_argument("--mp-check-images", type=count_arg, default=256, help="held-out images for that agreement check")


def measures_arg(text: str) -> dict:
    try:
        return measure_fields(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def runs_arg(text: str) -> list[tuple[str, int]]:
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


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one `fxq: error: ...` line (exit 2), like every other error."""

    def error(self, message: str):
        print(f"fxq: error: {self.prog}: {message}; see `{self.prog} --help`", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="fxq", description="post-training quantization of PyTorch models (torch.fx)")
    sub = p.add_subparsers(dest="cmd", required=True)

    qp = sub.add_parser("quantize", help="quantize a model, evaluate it, write model.pt + report.json")
    model_args(qp), device_arg(qp), data_args(qp), quant_args(qp)
    qp.add_argument("--weight-bits", type=count_arg, default=8)
    qp.add_argument("--out", required=True, help="output folder (must be new or empty unless --force)")
    force_arg(qp)
    qp.add_argument("--no-eval", action="store_true", help="skip the float/quantized evaluation")
    nproc_arg(qp)
    qp.set_defaults(command="quantize")

    ep = sub.add_parser("eval", help="top-1/top-5 of a quantized folder or a float model")
    ep.add_argument("--model", default=DEFAULT_MODEL, help="a folder written by `fxq quantize`, or a model name")
    ep.add_argument("--weights", default=None)
    ep.add_argument("--random-weights", action="store_true")
    device_arg(ep)
    ep.add_argument("--val", default=None, help=f"labeled images ({SHARED_SETS})")
    ep.add_argument(
        "--num-val", type=count_arg, default=None, help="evaluate on N val images, drawn at random (default all)"
    )
    subset_args(ep)
    ep.add_argument("--quiet", action="store_true")
    ep.set_defaults(command="eval")

    cp = sub.add_parser("compare", help="float vs quantized at several weight widths (the README's main job)")
    model_args(cp), device_arg(cp), data_args(cp), quant_args(cp)
    cp.add_argument(
        "--runs",
        type=runs_arg,
        default=runs_arg("rtn:8,rtn:4,eptq:4"),
        help="comma-separated METHOD:WEIGHT_BITS runs (default rtn:8,rtn:4,eptq:4)",
    )
    cp.add_argument("--out", default="runs/compare")
    force_arg(cp)
    nproc_arg(cp)
    cp.set_defaults(command="compare")

    pp = sub.add_parser("pareto", help="mixed precision over a sweep of budgets: table, JSON, PNG (top-1 vs size)")
    model_args(pp), device_arg(pp), data_args(pp), quant_args(pp)
    pp.add_argument("--avg-bits-list", type=floats_arg, default=[2.5, 3.0, 3.5, 4.0, 5.0, 6.0])
    pp.add_argument("--uniform", type=ints_arg, default=(2, 4, 8), help="uniform widths to plot for reference")
    pp.add_argument("--out", default="runs/pareto")
    force_arg(pp)
    pp.set_defaults(command="pareto")

    lp = sub.add_parser("lfh", help="label-free Hessian trace of every interest tensor (table, JSON, PNG)")
    model_args(lp), device_arg(lp), data_args(lp)
    lp.add_argument("--frontend", default=Frontend.AUTO.value, choices=[f.value for f in Frontend])
    lp.add_argument("--min-probes", type=count_arg, default=10)
    lp.add_argument("--max-probes", type=count_arg, default=100)
    lp.add_argument("--rel-tol", type=positive_float_arg, default=1e-3)
    lp.add_argument("--probe", default=Probe.GAUSSIAN.value, choices=[p.value for p in Probe])
    lp.add_argument("--probes-per-pass", type=count_arg, default=1)
    lp.add_argument("--seed", type=int, default=0)
    lp.add_argument("--out", default="runs/lfh")
    force_arg(lp)
    lp.set_defaults(command="lfh", num_calib=None)

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
    target_arg(xp, default=None)
    xp.add_argument(
        "--weight-storage",
        choices=["packed", "int8"],
        default="packed",
        help="onnx: weights of 4 bits or fewer as INT4 (packed: half the bytes; ONNX Runtime's CPU runs them "
        "dequantized) or every weight as int8 (ONNX Runtime's integer kernels run every layer)",
    )
    xp.add_argument("--calib", default=None, help=f"images the export is checked on ({SHARED_SETS})")
    xp.add_argument("--check-images", type=count_arg, default=64, help="how many of them (default 64)")
    xp.add_argument(
        "--force", action="store_true", help="write the export even when its check fails, or over an existing --out"
    )
    xp.add_argument("--quiet", action="store_true")
    xp.set_defaults(command="export")

    bp = sub.add_parser("bench", help="float vs quantized latency per backend (eager, ONNX Runtime, Inductor)")
    model_args(bp), data_args(bp), quant_args(bp)
    bp.add_argument("--weight-bits", type=count_arg, default=8)
    bp.add_argument("--batch-sizes", type=counts_arg, default=[1, 32])
    bp.add_argument("--iters", type=count_arg, default=20)
    bp.add_argument(
        "--backends",
        type=lambda s: s.split(","),
        default=None,
        help=f"comma-separated, from {','.join(BACKENDS)} (default: all; inductor-int8 where torchao is installed)",
    )
    bp.add_argument("--out", default=None, help="also write the rows as JSON")
    bp.add_argument(
        "--per-op",
        default=None,
        metavar="DIR",
        help="also time each quantized conv/linear alone on each backend (eager: fxq's reference; onnx; "
        "inductor-int8) against its float op and the machine's measured roofs; writes per_op_bBATCH.json/.csv "
        "and roofline_bBATCH.png into DIR",
    )
    force_arg(bp)
    bp.set_defaults(command="bench", num_calib=32, device="cpu")  # the backends it times are CPU ones
    return p
