"""Data-parallel rounding on this machine: the cost of the all-reduce, the traffic per step, and a worked estimate
of the speed-up on 8 and 64 GPUs.

    python bench/dist_scaling.py [--model efficientnet_lite0] [--batch-sizes 8,32] [--steps 12] [--json FILE]

Measured here, each in the same run:
- the rounding state of the model (V, biases: what each step all-reduces) and the teacher cache's row per image
  (what each step's all-to-all moves);
- the same for torchvision's ResNet-50 (random weights: sizes only);
- a gloo all-reduce of each state between 2 processes on this machine (median of 20);
- seconds per rounding step with 1 process (all threads) and with 2 processes (gloo, one thread each), at each
  batch size: the same global batch, the same cores.
Then the estimate for 8 and 64 GPUs (NVLink, 100 Gb/s Ethernet), from the assumptions in ASSUME.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
from torchvision.models import resnet50

import fxq
from fxq.config import LFHConfig, Method, PTQConfig, RoundingConfig
from fxq.data.images import batches, load_images
from fxq.data.models import DEFAULT_MODEL, default_image_sets, load_model
from fxq.ir.taps import interest_nodes
from fxq.pipeline import analyze, quantize_analyzed
from fxq.quant.modules import QuantWeight

# The estimate's assumptions (none measured here: no GPU is lent to this project).
ASSUME = {
    # one H100, Lite0, batch 32, fp32: teacher forward + student forward and backward (../shared/anchors/README.md)
    "lite0_step_b32_s": 22.7e-3,
    # a ResNet-50 step at batch 32 on one H100, fp32: about 3x Lite0's FLOPs per image, at a higher efficiency
    "resnet50_step_b32_s": 45e-3,
    # the smallest step a GPU takes however few images it gets (kernel launches of forward + backward + loss)
    "launch_floor_s": 6e-3,
    # the per-step work on the weights that every rank repeats (h(V), soft weights, bias correction, regulariser,
    # optimizer): about 20 reads or writes of the fp32 state, at HBM bandwidth
    "state_passes": 20,
    "hbm_Bps": 3e12,
    # NVLink: every GPU in one NVLink domain (an 8-GPU node; 64 GPUs as one NVLink domain), NCCL bus bandwidth
    "nvlink_busbw_Bps": 350e9,
    "nvlink_hop_s": 5e-6,
    # Ethernet: one GPU per machine, 100 Gb/s per machine at 80 %
    "ethernet_busbw_Bps": 10e9,
    "ethernet_hop_s": 30e-6,
}


def sizes(model: torch.nn.Module, images: torch.Tensor) -> dict:
    """The rounding state (V and biases, fp32) all-reduced each step, and the teacher cache's fp16 row per image
    (the output and every interest tensor) that the all-to-all moves, of `model` quantized on `images`."""
    qgm, _ = fxq.quantize(model, [images], PTQConfig(target=fxq.INT8.with_bits(4), progress=False))
    layers = [m for m in qgm.modules() if isinstance(m, QuantWeight)]
    weights = sum(qw.layer.weight.numel() for qw in layers)
    channels = sum(qw.layer.weight.shape[0] for qw in layers)
    with torch.no_grad():
        out = model(images[:1])
    row = sum(n.meta["tensor_meta"].shape[1:].numel() for n in interest_nodes(qgm)) + out[0].numel()
    return {"weights": weights, "state_bytes": 4 * (weights + channels), "teacher_row_bytes": 2 * row}


def _allreduce_rank(rank: int, size: int, folder: str, numels: list[int], out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/ar", rank=rank, world_size=size)
    for n in numels:
        t = torch.ones(n)
        dist.all_reduce(t)  # warm-up: the connections
        times = []
        for _ in range(20):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            times.append(time.perf_counter() - t0)
        if rank == 0:
            out[n] = statistics.median(times)
    dist.destroy_process_group()


def allreduce_seconds(numels: list[int]) -> dict[int, float]:
    """Median seconds of a gloo all-reduce of float32 buffers between 2 processes here."""
    with tempfile.TemporaryDirectory() as folder, multiprocessing.Manager() as m:
        out = m.dict()
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_allreduce_rank, args=(r, 2, folder, numels, out)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        return dict(out)


def _cfg(batch: int, steps: int) -> PTQConfig:
    rounding = RoundingConfig(iterations=steps, batch_size=batch, warmup=0.0, keep_best=False, teacher_cache="on")
    return PTQConfig(
        target=fxq.INT8.with_bits(4), method=Method.EPTQ, rounding=rounding, lfh=LFHConfig(2, 2), progress=False
    )


def _step_rank(rank: int, size: int, folder: str, model: str, images: int, batch: int, steps: int, out) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    if size > 1:
        dist.init_process_group("gloo", init_method=f"file://{folder}/st{batch}", rank=rank, world_size=size)
    fxq.keep_freed_memory()
    lm = load_model(model)
    calib = load_images(default_image_sets(model)[0], lm.preprocess, images, progress=False)
    xs = batches(calib.x, 32)
    cfg = _cfg(batch, steps)
    _, report = quantize_analyzed(analyze(lm.model, xs, cfg), xs, cfg)
    if rank == 0:
        out["seconds_per_step"] = report.rounding["seconds_per_step_after_first"]
    if size > 1:
        dist.destroy_process_group()


def step_seconds(model: str, images: int, batch: int, steps: int, size: int) -> float:
    with tempfile.TemporaryDirectory() as folder, multiprocessing.Manager() as m:
        out = m.dict()
        ctx = multiprocessing.get_context("spawn")
        args = (size, folder, model, images, batch, steps, out)
        procs = [ctx.Process(target=_step_rank, args=(r, *args)) for r in range(size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        return out["seconds_per_step"]


def ring_allreduce(n: int, nbytes: float, busbw: float, hop: float) -> float:
    """A ring all-reduce of nbytes over n ranks: 2(n-1)/n of the bytes through each link, 2(n-1) hops."""
    return 2 * (n - 1) / n * nbytes / busbw + 2 * (n - 1) * hop if n > 1 else 0.0


def estimate(state_bytes: int, row_bytes: int, step_b32: float, n: int, net: str, per_gpu_batch: int) -> dict:
    """One step at per_gpu_batch images on each of n GPUs (global batch n x per_gpu_batch), against one GPU doing
    the same global batch in steps of 32."""
    a = ASSUME
    busbw, hop = a[f"{net}_busbw_Bps"], a[f"{net}_hop_s"]
    repeated = a["state_passes"] * state_bytes / a["hbm_Bps"]  # every rank's own weight-side work
    compute = max(a["launch_floor_s"], step_b32 * per_gpu_batch / 32 + repeated)
    comm = ring_allreduce(n, state_bytes, busbw, hop)
    exchange = per_gpu_batch * row_bytes * (n - 1) / n / busbw  # the cache rows the other GPUs own
    one_gpu = step_b32 * n * per_gpu_batch / 32  # the same images on one GPU
    step = compute + comm + exchange
    return {
        "n": n,
        "net": net,
        "per_gpu_batch": per_gpu_batch,
        "compute_s": compute,
        "allreduce_s": comm,
        "exchange_s": exchange,
        "step_s": step,
        "speedup": one_gpu / step,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--images", type=int, default=256, help="calibration images the step runs read")
    p.add_argument("--batch-sizes", default="8,32")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    fxq.keep_freed_memory()
    lm = load_model(args.model)
    calib = load_images(default_image_sets(args.model)[0], lm.preprocess, 8, progress=False)
    models = {args.model: sizes(lm.model, calib.x), "resnet50": sizes(resnet50().eval(), torch.randn(8, 3, 224, 224))}
    for name, m in models.items():
        print(
            f"{name}: {m['weights'] / 1e6:.2f} M weights; rounding state {m['state_bytes'] / 1e6:.1f} MB all-reduced "
            f"per step; teacher cache row {m['teacher_row_bytes'] / 1e6:.2f} MB per image (fp16)"
        )
    numels = {name: m["state_bytes"] // 4 for name, m in models.items()}
    ar = allreduce_seconds(list(numels.values()))
    each = ", ".join(f"{name} {1e3 * ar[n]:.1f} ms" for name, n in numels.items())
    print(f"gloo all-reduce of the state, 2 processes here: {each}")
    out = {"model": args.model, "cpu_threads": os.cpu_count(), "sizes": models}
    out["allreduce_s"] = {name: ar[n] for name, n in numels.items()}
    out["steps"] = {}
    for b in (int(v) for v in args.batch_sizes.split(",")):
        one = step_seconds(args.model, args.images, b, args.steps, 1)
        two = step_seconds(args.model, args.images, b, args.steps, 2)
        out["steps"][b] = {"one_process_s": one, "two_processes_s": two}
        print(
            f"batch {b}: {one:.3f} s per step in 1 process, {two:.3f} s in 2 (gloo) -> {one / two:.2f}x; "
            f"the all-reduce is {100 * ar[numels[args.model]] / two:.1f} % of the 2-process step"
        )
    rows = []
    steps_b32 = {args.model: ASSUME["lite0_step_b32_s"], "resnet50": ASSUME["resnet50_step_b32_s"]}
    for label, m in models.items():
        for n in (8, 64):
            for net in ("nvlink", "ethernet"):
                for per_gpu in (max(32 // n, 1), 32):
                    r = estimate(m["state_bytes"], m["teacher_row_bytes"], steps_b32[label], n, net, per_gpu)
                    rows.append({"model": label, **r})
    print(
        f"\n{'model':<18} {'GPUs':>4} {'network':<9} {'imgs/GPU':>8} {'compute':>9} {'all-reduce':>10} "
        f"{'exchange':>9} {'speed-up':>8}"
    )
    for r in rows:
        print(
            f"{r['model']:<18} {r['n']:>4} {r['net']:<9} {r['per_gpu_batch']:>8} {1e3 * r['compute_s']:7.2f}ms "
            f"{1e3 * r['allreduce_s']:8.2f}ms {1e3 * r['exchange_s']:7.2f}ms {r['speedup']:7.1f}x"
        )
    out["estimate"], out["assume"] = rows, ASSUME
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
