"""Coverage: which models fxq takes in end to end, and how much of their output W8A8 and W4A8 RTN keep.

    python bench/coverage.py                          # every group; rows already in the JSON are kept
    python bench/coverage.py --group timm --only deit_tiny_patch16_224 --redo
    python bench/coverage.py --table                  # print the table from the JSON, run nothing

Models: every torchvision classification model, the torchvision detection and segmentation models, and a list of
timm models (when timm is installed; it is a bench-only dependency). All with random weights, settled so that
they behave (fxq.data.models.settle_random_weights_). Each model runs in its own process with a time limit, so a
crash or a hang costs one row. Per row: the front-end that traced it (fx first, then export), the conv / linear /
matmul ops quantized out of those in the graph, the share of the model's conv/linear weight elements quantized,
the SQNR of the model output against float at W8A8 and W4A8 (4 calibration images, 2 other images) beside the
float model's own output when only its input is rounded to 8 bits (the ceiling of a random network) and the W8A8
model with each activation quantizer replaced by uniform noise of its step (what an ideal 8-bit grid of that
step costs this network, clipping left out), whether
EPTQ runs (a few steps), the W8A8 run's seconds, and the first line of any error. Rows go to --json as they
finish (written atomically); the table goes to bench/COVERAGE.md.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torchvision
from torch import nn

HERE = Path(__file__).resolve().parent
DETECTION = [
    "retinanet_resnet50_fpn",
    "ssdlite320_mobilenet_v3_large",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fcos_resnet50_fpn",
]
SEGMENTATION = ["deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large", "fcn_resnet50"]
TRAINED = ["efficientnet_lite0", "cifar10_resnet20", "cifar10_resnet32"]  # the shipped trained models, real images
TIMM = [
    "deit_tiny_patch16_224",
    "vit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224",
    "mobilevit_xxs",
    "mixer_s16_224",
    "resmlp_12_224",
    "levit_128s",
    "convnext_atto",
    "efficientformer_l1",
    "regnety_002",
]
HOW = (
    "Commands: `python bench/coverage.py` (fxq), then `.bench-venv/bin/python bench/coverage.py --tool mct` (a "
    "bench environment with model-compression-toolkit); `--table` rewrites this file from the two JSON files. "
    "Random weights settled on random images; inputs 64 px (96 for GoogLeNet, 299 for Inception, 224 for the "
    "transformers, 320 for the detectors); 4 calibration images, SQNR of the output on 2 others against the float "
    "model (detectors: their raw head outputs). *input-only*: the float model's own SQNR when only its input is "
    "rounded to 8 bits: a random network amplifies small perturbations, so a quantized one cannot do much better "
    "than this. *step-noise*: the W8A8 model with each activation quantizer replaced by uniform noise of its step "
    "(what an ideal 8-bit grid costs the network, clipping left out). *below 25 dB*: whether the network (input-only "
    "or step-noise already below 25 dB) or the quantizer holds the row there. The *trained* rows are the shipped "
    "trained models on real images (4 calibration images, 2 val images), for what a trained network keeps. "
    "*EPTQ*: 2 rounding steps on 2 LFH probes at W4A8."
)
FIXED_SIZE = ("vit_", "swin", "maxvit", "deit", "mixer", "resmlp", "levit", "efficientformer", "mobilevit")


def groups() -> dict[str, list[str]]:
    return {
        "torchvision": sorted(torchvision.models.list_models(module=torchvision.models)),
        "detection": DETECTION,
        "segmentation": SEGMENTATION,
        "timm": TIMM,
        "trained": TRAINED,
    }


def _size(name: str) -> int:
    if name.startswith(FIXED_SIZE):
        return 224
    if name in DETECTION:
        return 320
    if name.startswith("inception"):
        return 299  # its auxiliary head (run while the batch norms settle) needs the full size
    return 96 if name.startswith("googlenet") else 64


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _inputs(group: str, name: str, calib_images: int = 4) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A row's calibration batches (of 2 images) and the 2 images its SQNR is taken on: random images, or real
    ones for the trained models."""
    if group != "trained":
        size = _size(name)
        seeds = [1, 3, *range(100, 100 + calib_images // 2 - 2)]  # 4 images: the table's first protocol
        return [_images(2, size, k) for k in seeds], _images(2, size, 2)
    from fxq.data.images import load_images
    from fxq.data.models import default_image_sets, load_model

    calib_dir, val_dir = default_image_sets(name)
    pre = load_model(name).preprocess
    calib = load_images(calib_dir, pre, subset=calib_images, progress=False).x  # drawn with a fixed seed
    x = load_images(val_dir, pre, subset=2, progress=False).x
    return list(calib.split(2)), x


def build(group: str, name: str) -> nn.Module:
    from fxq.data.models import settle_random_weights_

    torch.manual_seed(0)
    if group == "trained":
        from fxq.data.models import load_model

        return load_model(name).model.eval()
    if group == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
    elif group == "detection":
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None)
    elif group == "segmentation":
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None, aux_loss=False)
    else:
        model = torchvision.models.get_model(name)
    size = _size(name)
    if group == "detection":  # detectors in train mode want targets: settle their backbone alone
        settle_random_weights_(model.backbone, lambda i: _images(8, size, 10 + i))
        return model.eval()
    return settle_random_weights_(model, lambda i: _images(8, size, 10 + i))


def _first(out):
    """The model output as one tensor, for the SQNR (a dict of heads: its first entry)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return _first(next(iter(out.values())))
    if isinstance(out, (list, tuple)) and out:
        return _first(out[0])
    raise TypeError(f"no tensor in the output ({type(out).__name__})")


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach().float(), out.detach().float()
    if ref.shape != out.shape:
        raise ValueError(f"output shape {tuple(out.shape)} differs from the float model's {tuple(ref.shape)}")
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum().clamp_min(1e-30)))


def _counts(model: nn.Module, qgm) -> dict:
    from fxq.ir.meta import OpKind, q
    from fxq.ir.ops import grid_source, kind_of
    from fxq.quant.modules import ActQuant, QuantWeight

    ops = quantized = 0
    graphs = [m for m in qgm.modules() if isinstance(m, torch.fx.GraphModule)]  # the model, or its parts
    for g, n in ((graph, n) for graph in graphs for n in graph.graph.nodes):
        kind = q(n).kind if q(n).kind is not None else kind_of(g, n)
        mod = g.get_submodule(n.target) if n.op == "call_module" else None
        if isinstance(mod, QuantWeight):
            ops, quantized = ops + 1, quantized + 1
        elif kind in (OpKind.CONV, OpKind.LINEAR, OpKind.MATMUL):
            ops += 1
            inputs = [a for a in n.args[:2] if isinstance(a, torch.fx.Node)]
            quantized += kind is OpKind.MATMUL and all(grid_source(g, a, ActQuant) for a in inputs)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)))
    weights += sum(m.in_proj_weight.numel() for m in model.modules() if isinstance(m, nn.MultiheadAttention))
    done = {id(m.layer.weight): m.layer.weight.numel() for m in qgm.modules() if isinstance(m, QuantWeight)}
    return {"ops": ops, "quantized_ops": quantized, "weights_pct": 100.0 * sum(done.values()) / max(weights, 1)}


def _output_of(group: str):
    """What a row compares: a detector's raw head outputs, any other model's output (its first tensor)."""
    return _head_output if group == "detection" else (lambda model, x: _first(model(x)))


def _head_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A detector's raw head outputs on `x`, flattened into one tensor: its detections are lists whose lengths
    follow the scores, so the SQNR is taken before the post-processing. A two-stage detector's first-stage head
    (the RPN's): the second stage sees as many proposals as the first keeps, a count that differs between models."""
    path = "head" if hasattr(model, "head") else "rpn.head"
    seen = []
    hook = model.get_submodule(path).register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad():
            model(x)
    finally:
        hook.remove()
    leaves = [t for t in torch.utils._pytree.tree_leaves(seen[0]) if isinstance(t, torch.Tensor)]
    return torch.cat([t.flatten() for t in leaves])


def _step_noise_sqnr(qgm: nn.Module, output, ref: torch.Tensor, x: torch.Tensor) -> float:
    """The output SQNR of `qgm` with each activation quantizer replaced by uniform noise of its step (seeded)."""
    from fxq.quant.modules import ActQuant

    acts = [m for m in qgm.modules() if isinstance(m, ActQuant)]
    gen = torch.Generator().manual_seed(0)
    for m in acts:
        m.forward = lambda t, m=m: t + (torch.rand(t.shape, generator=gen) - 0.5).to(t) * m.scale
    try:
        with torch.no_grad():
            return _sqnr(ref, output(qgm, x))
    finally:
        for m in acts:
            del m.forward  # back to the class's


def measure(group: str, name: str, calib_images: int = 4, partial=None) -> dict:
    """One row: trace with fx, else export; W8A8 and W4A8 RTN; a few EPTQ steps. `partial(row)` gets the row
    before the EPTQ steps, so a process killed there (out of memory) still leaves its RTN figures."""
    import fxq
    from fxq.config import LFHConfig, Method, PTQConfig, RoundingConfig
    from fxq.targets import INT8

    model = build(group, name)
    calib, x = _inputs(group, name, calib_images)
    size = x.shape[-1]
    step = x.abs().max() / 127
    output = _output_of(group)
    with torch.no_grad():
        ref = output(model, x)
        # the float model's own sensitivity: its output when only the input is rounded to 8 bits. A quantized model
        # rounds the input too, so it cannot do much better; a random network can be chaotic (batch norm at
        # initialisation amplifies perturbations layer by layer), and this shows where that bounds a row
        input_only = _sqnr(ref, output(model, torch.round(x / step) * step))
    row: dict = {"group": group, "model": name, "size": size, "sqnr_input_only": round(input_only, 2)}
    row["calib_images"] = calib_images
    errors = []
    for frontend in ("fx", "export", "auto"):  # auto: part by part where neither traces the whole model
        try:
            start = time.perf_counter()
            qgm, report = fxq.quantize(model, calib, PTQConfig(frontend=frontend, progress=False))
            row["seconds"] = round(time.perf_counter() - start, 1)
            with torch.no_grad():
                row["sqnr_w8a8"] = round(_sqnr(ref, output(qgm, x)), 2)
            row["sqnr_step_noise"] = round(_step_noise_sqnr(qgm, output, ref, x), 2)
            row["frontend"] = report.frontend if report.frontend == "parts" else frontend
            if report.frontend == "parts":
                row["parts"] = report.settings["parts"]
            break
        except Exception as e:  # noqa: BLE001 - a row records any failure
            errors.append(f"{frontend}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    if "frontend" not in row:
        row["error"] = " | ".join(errors)
        return row
    row.update(_counts(model, qgm))
    frontend = "auto" if row["frontend"] == "parts" else row["frontend"]
    cfg = PTQConfig(target=INT8.with_bits(4, 8), frontend=frontend, progress=False)
    try:
        q4, _ = fxq.quantize(model, calib, cfg)
        with torch.no_grad():
            row["sqnr_w4a8"] = round(_sqnr(ref, output(q4, x)), 2)
    except Exception as e:  # noqa: BLE001
        row["error"] = f"W4A8: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
    if partial is not None:
        partial({**row, "eptq": "not finished"})
    eptq = PTQConfig(
        target=INT8.with_bits(4, 8),
        method=Method.EPTQ,
        frontend=frontend,
        lfh=LFHConfig(images=2, batch_size=2, min_probes=2, max_probes=2),
        rounding=RoundingConfig(iterations=2, batch_size=2),
        progress=False,
    )
    qgm = q4 = None  # the RTN models' weights out of memory before the optimization's state comes in
    gc.collect()
    try:
        _, report = fxq.quantize(model, calib, eptq)
        groups = report.rounding["groups"]
        row["eptq"] = "ok" if len(groups) == 1 else f"ok, in {len(groups)} groups of layers"
    except Exception as e:  # noqa: BLE001
        row["eptq"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return row


def measure_mct(group: str, name: str, calib_images: int = 4) -> dict:
    """The same row with model-compression-toolkit's PTQ (its default IMX500 TPC at W8A8, the anchors' 4-bit
    rebuild at W4A8), for the side-by-side: run with a bench environment that has MCT installed."""
    import model_compression_toolkit as mct

    sys.path.insert(0, str(HERE.parent.parent / "shared" / "anchors" / "mct"))
    from common import make_tpc  # the anchors' TPC with every kernel at the given width

    model = build(group, name)
    calib, x = _inputs(group, name, calib_images)
    size = x.shape[-1]
    output = _output_of(group)
    with torch.no_grad():
        ref = output(model, x)
    row: dict = {"group": group, "model": name, "size": size, "tool": f"mct {mct.__version__}"}

    def gen():
        for b in calib:
            yield [b]

    for bits in (8, 4):
        try:
            start = time.perf_counter()
            qmodel, _ = mct.ptq.pytorch_post_training_quantization(
                copy.deepcopy(model), gen, target_platform_capabilities=make_tpc(bits)
            )
            if bits == 8:
                row["seconds"] = round(time.perf_counter() - start, 1)
                row["frontend"] = "mct fx"
                wrapped = [m for m in qmodel.modules() if type(m).__name__ == "PytorchQuantizationWrapper"]
                row["quantized_ops"] = sum(bool(getattr(m, "weights_quantizers", None)) for m in wrapped)
                row["ops"] = sum(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) for m in model.modules())
            qmodel = qmodel.cpu().eval()
            with torch.no_grad():
                row[f"sqnr_w{bits}a8"] = round(_sqnr(ref, output(qmodel, x)), 2)
        except Exception as e:  # noqa: BLE001 - a row records any failure
            row["error"] = f"W{bits}A8: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
            break
    return row


def _run_one(group: str, name: str, timeout: float, tool: str = "fxq", calib_images: int = 4) -> dict:
    """`measure` in a child process: a crash, a hang or an out-of-memory costs this row alone."""
    cmd = [sys.executable, __file__, "--row", group, name, "--tool", tool, "--calib-images", str(calib_images)]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent)
    except subprocess.TimeoutExpired:
        return {"group": group, "model": name, "error": f"over the {timeout:.0f} s limit"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
    if done.returncode == -signal.SIGKILL:
        tail = "killed (out of memory?)"
    if not lines:
        return {"group": group, "model": name, "error": f"exit {done.returncode}: {tail}"}
    row = json.loads(lines[-1])
    if done.returncode != 0:  # the row as it stood before the EPTQ steps
        row["eptq"] = f"exit {done.returncode}: {tail}"
    row["wall_seconds"] = round(time.perf_counter() - start, 1)
    return row


FLOOR_DB = 25.0  # the W8A8 output SQNR a row should keep unless the network itself cannot


def _held_by(row: dict) -> str:
    """Why a W8A8 row is below FLOOR_DB: the network (its output already below it when only the input is rounded,
    or when every activation gets noise of its 8-bit step instead of the grid), else the quantizer."""
    if "sqnr_w8a8" not in row or row["sqnr_w8a8"] >= FLOOR_DB:
        return ""
    if row.get("sqnr_input_only", FLOOR_DB) < FLOOR_DB:
        return "network (input-only)"
    if row.get("sqnr_step_noise", FLOOR_DB) < FLOOR_DB:
        return "network (step noise)"
    return "quantizer" if "sqnr_step_noise" in row else "quantizer?"


def table(rows: list[dict], mct: dict[tuple[str, str], dict]) -> str:
    """The fxq rows, with model-compression-toolkit's figures for the same model beside them where measured."""
    head = (
        "| group | model | front-end | quantized ops | weights % | input-only dB | step-noise dB | W8A8 dB | below 25 dB "
        "| W4A8 dB | EPTQ | s "
        "| error | MCT quantized | MCT W8A8 dB | MCT W4A8 dB | MCT s | MCT error |"
    )
    out = [head, "|" + "---|" * 18]
    num = lambda r, k, f="{:.1f}": f.format(r[k]) if k in r else ""  # noqa: E731
    for r in rows:
        m = mct.get((r["group"], r["model"]), {})
        cells = [
            r["group"],
            r["model"],
            r.get("frontend", "-"),
            f"{r['quantized_ops']}/{r['ops']}" if "ops" in r else "",
            num(r, "weights_pct", "{:.0f}"),
            num(r, "sqnr_input_only"),
            num(r, "sqnr_step_noise"),
            num(r, "sqnr_w8a8"),
            _held_by(r),
            num(r, "sqnr_w4a8"),
            r.get("eptq", ""),
            num(r, "seconds", "{:.0f}"),
            (r.get("error") or "").replace("|", "/")[:160],
            f"{m['quantized_ops']}/{m['ops']}" if "ops" in m else ("" if m else "not run"),
            num(m, "sqnr_w8a8"),
            num(m, "sqnr_w4a8"),
            num(m, "seconds", "{:.0f}"),
            (m.get("error") or "").replace("|", "/")[:120],
        ]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    through = sum("frontend" in r for r in rows)
    tried = [m for m in mct.values()]
    held = [_held_by(r) for r in rows]
    out += [
        "",
        f"fxq: {through} of {len(rows)} models through end to end; W8A8 at {FLOOR_DB:.0f} dB or more: "
        f"{sum('sqnr_w8a8' in r and not h for r, h in zip(rows, held))}; below it, held by the network: "
        f"{sum(h.startswith('network') for h in held)}, by the quantizer: {held.count('quantizer')}, not yet "
        f"told apart (no step-noise figure): {held.count('quantizer?')}.",
    ]
    if tried:
        ok = sum("sqnr_w8a8" in m for m in tried)
        both = [(r, mct[(r["group"], r["model"])]) for r in rows if (r["group"], r["model"]) in mct]
        fxq_ok = sum("frontend" in r for r, _ in both)
        out.append(
            f"MCT: {ok} of {len(tried)} models it was run on through W8A8 (fxq: {fxq_ok} of the same {len(both)})."
        )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group", default="all", choices=["all", *groups()])
    p.add_argument("--only", nargs="*", default=None, help="these models only")
    p.add_argument("--json", type=Path, default=None, help="default: bench/coverage.json (mct: coverage_mct.json)")
    p.add_argument("--markdown", type=Path, default=None, help="default: bench/COVERAGE.md")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per model")
    p.add_argument("--calib-images", type=int, default=4, help="even; other than 4: its own JSON file")
    p.add_argument("--redo", action="store_true", help="measure rows already in the JSON again")
    p.add_argument("--table", action="store_true", help="write the table from the JSON files, measure nothing")
    p.add_argument("--tool", default="fxq", choices=["fxq", "mct"], help="mct: run with an environment that has it")
    p.add_argument("--row", nargs=2, metavar=("GROUP", "NAME"), help=argparse.SUPPRESS)  # the child process
    a = p.parse_args()
    if a.calib_images < 4 or a.calib_images % 2:
        p.error(f"--calib-images must be even and at least 4, not {a.calib_images}")
    if a.row:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        try:
            if a.tool == "fxq":
                row = measure(*a.row, a.calib_images, partial=lambda r: print(json.dumps(r), flush=True))
            else:
                row = measure_mct(*a.row, a.calib_images)
            print(json.dumps(row))
        except Exception as e:  # noqa: BLE001 - building the model failed: still one row
            traceback.print_exc()
            print(json.dumps({"group": a.row[0], "model": a.row[1], "error": f"{type(e).__name__}: {e}"[:300]}))
        return

    from fxq.io.files import write_atomic, write_json_atomic

    suffix = "" if a.calib_images == 4 else f"_calib{a.calib_images}"  # each protocol its own files
    a.json = a.json or HERE / (f"coverage{suffix}.json" if a.tool == "fxq" else f"coverage_mct{suffix}.json")
    a.markdown = a.markdown or HERE / f"COVERAGE{suffix}.md"
    rows = json.loads(a.json.read_text())["rows"] if a.json.exists() else []
    if not a.table:
        todo = [(g, n) for g, names in groups().items() if a.group in ("all", g) for n in names]
        if a.group == "timm" or a.group == "all":
            try:
                import timm  # noqa: F401
            except ImportError:
                print("timm is not installed: its rows are left out (pip install timm)")
                todo = [(g, n) for g, n in todo if g != "timm"]
        todo = [(g, n) for g, n in todo if a.only is None or n in a.only]
        have = {(r["group"], r["model"]) for r in rows}
        todo = [t for t in todo if a.redo or t not in have]
        start = time.perf_counter()
        for i, (g, n) in enumerate(todo):
            row = _run_one(g, n, a.timeout, a.tool, a.calib_images)
            rows = [r for r in rows if (r["group"], r["model"]) != (g, n)] + [row]
            write_json_atomic(a.json, {"cpu": _cpu(), "torch": torch.__version__, "rows": rows})
            spent = time.perf_counter() - start
            eta = spent / (i + 1) * (len(todo) - i - 1)
            status = row.get("error") or f"{row.get('sqnr_w8a8')} dB"
            print(f"[{i + 1}/{len(todo)} eta {eta / 60:.0f} min] {g} {n}: {status}", flush=True)
    order = {g: k for k, g in enumerate(groups())}
    fxq_rows = rows if a.tool == "fxq" else _rows(HERE / f"coverage{suffix}.json")
    mct_rows = rows if a.tool == "mct" else _rows(HERE / f"coverage_mct{suffix}.json")
    fxq_rows.sort(key=lambda r: (order.get(r["group"], 9), r["model"]))
    text = table(fxq_rows, {(r["group"], r["model"]): r for r in mct_rows})
    print(text)
    body = f"# Coverage\n\n{HOW}\n\nMeasured on {_cpu()}; this table: {a.calib_images} calibration images.\n\n{text}\n"
    write_atomic(a.markdown, lambda path: path.write_text(body))  # also after --table: it follows the JSON files


def _rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"] if path.exists() else []


def _cpu() -> str:
    from fxq.targets import cpu_description

    return cpu_description()


if __name__ == "__main__":
    main()
