"""Rounding: EPTQ's rounding optimization, one knowledge distillation over the whole network (METHOD.md s. 3).

Every weight quantizer gets AdaRound variables V (soft weight s * clamp(floor(w/s) + h(V))), every
quantized layer's bias is trainable, activations stay quantized. All layers' V and biases are flat tensors
(fxq.soft_rounding) and the interest tensors travel packed (fxq.distillation), so a step's extra kernels
beyond the forward and backward number a few dozen, not some twenty per layer. The loss compares the quantized graph's
interest tensors with the float graph's on unlabeled images, weighted by the LFH (lambda_z), plus the
rounding regulariser lambda_reg * sum(1 - |2h - 1|^beta) with beta annealed 20 -> 2 after a warm-up with
the regulariser off. At the end every weight is rounded hard onto its grid.

Each tensor's squared error is taken relative to its float energy (as MCT does), so that tensors of very
different scales weigh by their lambda alone; the model output joins Z with the largest lambda. Batches
come from a stateless sampler (step -> images), so a resumed run sees the same batches as an
uninterrupted one.
"""

from __future__ import annotations

import math
import time

import torch
from fxq.passes.observe import float_graph
from torch import Tensor, nn
from torch.fx import GraphModule
from tqdm.auto import tqdm

from fxq.checkpoint import load_checkpoint, save_checkpoint
from fxq.config import LossWeights, RoundingConfig
from fxq.distillation import Workspace, column_lengths, pack, packed_loss, row_energies
from fxq.errors import ConfigError, GraphCheckFailed
from fxq.meta import gq, q
from fxq.modules import ActQuant, QuantWeight
from fxq.ops import device_of, set_eval_
from fxq.passbase import FxqPass, PassResult
from fxq.soft_rounding import SoftRounding
from fxq.taps import interest_nodes, quantized_value, with_taps

__all__ = ["Rounding", "float_teacher", "batch_indices", "beta_at", "interest_weights"]

CHECKPOINT = "rounding.pt"


def float_teacher(gm: GraphModule) -> GraphModule:
    """A frozen copy of the float graph (observers taken out, if gm was calibrated), with its own node state."""
    teacher = float_graph(gm)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return set_eval_(teacher)


def bf16_autocast(device: torch.device, amp: bool | None) -> torch.autocast:
    """RoundingConfig.amp on `device`: None autocasts on CUDA only, True everywhere, False nowhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" if amp is None else amp)


def batch_indices(n: int, batch: int, step: int, seed: int) -> Tensor:
    """The images of step `step`: epochs of seeded permutations, a pure function of its arguments."""
    per_epoch = max(n // batch, 1)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    if n < batch:
        perm = perm.repeat(math.ceil(batch / n))
    return perm[k * batch : (k + 1) * batch]


def beta_at(step: int, cfg: RoundingConfig) -> float | None:
    """The regulariser's beta at `step`, or None during the warm-up (regulariser off)."""
    start = int(cfg.warmup * cfg.iterations)
    if step < start:
        return None
    frac = (step - start) / max(cfg.iterations - start, 1)
    return cfg.beta[0] + (cfg.beta[1] - cfg.beta[0]) * frac


def interest_weights(gm: GraphModule, kind: LossWeights, with_output: bool) -> Tensor:
    """lambda_z per interest tensor (the output first when `with_output`), scaled to mean 1."""
    z = interest_nodes(gm)
    if kind is LossWeights.OUTPUT:
        if not with_output:
            raise GraphCheckFailed(
                "loss_weights='output' measures the model output, but this model does not return one tensor; "
                "use 'lfh' or 'mean'"
            )
        w = torch.zeros(len(z) + 1)
        w[0] = 1.0
        return w / w.mean()
    if kind is LossWeights.MEAN:
        w = torch.ones(len(z))
    else:
        missing = [n.name for n in z if q(n).lfh_weight is None]
        if missing:
            raise GraphCheckFailed(
                f"rounding: no LFH weight on interest tensors {missing[:3]}; run the LFH pass on the float graph "
                f"first, or use loss_weights='mean'"
            )
        w = torch.tensor([q(n).lfh_weight for n in z], dtype=torch.float32)
    if with_output:  # the output: the largest trace of all (J = I)
        w = torch.cat([w.max().reshape(1) if len(w) else torch.ones(1), w])
    if not bool(w.any()):  # one tensor alone has log-normalised weight 0: then all count alike
        w = torch.ones_like(w)
    return w / w.mean()  # mean 1: the LFH and plain-mean runs share lr and lambda_reg


class Rounding(FxqPass):
    """Optimize the rounding of every quantized weight (and the biases) against the float `teacher`."""

    def __init__(self, teacher: GraphModule, images: Tensor, config: RoundingConfig = RoundingConfig(), progress=True):
        self.teacher = teacher
        self.images = images if config.images is None else images[: config.images]
        self.cfg = config
        self.progress = progress

    def requires(self, gm: GraphModule) -> None:
        if not any(isinstance(m, QuantWeight) for m in gm.modules()):
            raise GraphCheckFailed("rounding: no quantized weights in the graph; run Quantize first")
        if not interest_nodes(gm):
            raise GraphCheckFailed("rounding: no interest tensors marked; run InterestPoints first")
        if len(self.images) == 0:
            raise GraphCheckFailed("rounding: no images given; pass the calibration images")

    def call(self, gm: GraphModule) -> PassResult:
        cfg, device = self.cfg, device_of(gm)
        set_eval_(gm)
        layers = [m for m in gm.modules() if isinstance(m, QuantWeight)]
        nhwc = cfg.channels_last and self.images.dim() == 4
        student, teacher = self._tapped(gm)
        images = self.images.to(device) if device.type == "cuda" else self.images
        trainable = {p: p.requires_grad for p in gm.parameters()}
        for p in trainable:
            p.requires_grad_(False)
        rtn = [(qw.quantized_weight().detach().clone(), qw.ensure_bias().detach().clone()) for qw in layers]
        soft = None
        try:  # everything set up from here on is undone in `finally`
            use_fused_act_quant_(gm, True)
            if nhwc:  # before V is made from the weights, so V and its gradients are NHWC too
                gm.to(memory_format=torch.channels_last)
                self.teacher.to(memory_format=torch.channels_last)
            soft = SoftRounding(layers, cfg.train_scale)
            soft.bias.requires_grad_(cfg.train_bias)
            opt_v = torch.optim.RAdam([soft.v], lr=cfg.lr_rounding)
            groups = [{"params": [soft.bias], "lr": cfg.lr_bias}]
            if soft.scale_factor is not None:
                groups.append({"params": [soft.scale_factor], "lr": cfg.lr_scale})
            opt_b = torch.optim.SGD(groups, foreach=True)
            t0 = time.perf_counter()
            targets = _TeacherTargets(teacher, images, cfg, [n.name for n in interest_nodes(gm)])
            cache_seconds = time.perf_counter() - t0
            weights = interest_weights(gm, cfg.loss_weights, targets.out_is_tensor).to(device)
            stats = self._optimize(soft, student, targets, images, weights, opt_v, opt_b)
            stats.update(teacher_cache=targets.cache is not None, teacher_cache_seconds=cache_seconds)
            soft.harden_()
            if cfg.keep_best:
                stats.update(self._keep_best(layers, rtn, student, targets, images, weights))
        finally:
            if soft is not None:
                soft.close()
            for p, flag in trainable.items():
                p.requires_grad_(flag)
            use_fused_act_quant_(gm, False)
            if nhwc:
                gm.to(memory_format=torch.contiguous_format)
                self.teacher.to(memory_format=torch.contiguous_format)
        for node in gm.graph.nodes:  # a trained step moved the thresholds the report shows
            if node.op == "call_module" and isinstance(qw := gm.get_submodule(node.target), QuantWeight):
                q(node).w_threshold = qw.scale * qw.spec.levels_per_threshold
        gq(gm).rounding = stats
        return PassResult(gm, modified=True)

    def ensures(self, gm: GraphModule) -> None:
        for name, qw in gm.named_modules():
            if isinstance(qw, QuantWeight):
                w = qw.layer.weight.detach()
                if not torch.equal(qw.hard_codes() * qw.scale_like(w), w):
                    raise GraphCheckFailed(f"rounding: {name}'s weight is off its integer grid after hardening")

    def _tapped(self, gm: GraphModule) -> tuple[GraphModule, GraphModule]:
        z = interest_nodes(gm)
        by_name = {n.name: n for n in self.teacher.graph.nodes}
        missing = [n.name for n in z if n.name not in by_name]
        if missing:
            raise GraphCheckFailed(f"rounding: the teacher graph lacks interest tensors {missing[:3]}")
        student = with_taps(gm, [quantized_value(n) for n in z])
        teacher = with_taps(self.teacher.to(device_of(gm)), [by_name[n.name] for n in z])
        if self.cfg.compile:
            student, teacher = torch.compile(student), torch.compile(teacher)
        return student, teacher

    def _fingerprint(self, layers: list[QuantWeight]) -> dict:
        c = self.cfg
        return {
            "layers": len(layers),
            "weights": sum(qw.layer.weight.numel() for qw in layers),
            "bits": [qw.spec.bits for qw in layers],
            "images": len(self.images),
            "iterations": c.iterations,
            "batch_size": c.batch_size,
            "seed": c.seed,
            "loss_weights": c.loss_weights.value,
            "train_scale": c.train_scale,
            "state": "flat",  # SoftRounding's flat V, biases and factors (earlier checkpoints held them per layer)
        }

    def _losses(self, student, targets: _TeacherTargets, idx: Tensor, x: Tensor, weights: Tensor) -> Tensor:
        zf, zf_energy = targets(idx, x)
        with bf16_autocast(x.device, self.cfg.amp):
            zq = _flat(student(x), targets.out_is_tensor)
        cfg = self.cfg
        return packed_loss(
            zf, zq, targets.lengths, weights, cfg.normalize_loss, zf_energy, targets.nhwc, targets.workspace
        )

    def _optimize(self, soft: SoftRounding, student, targets, images, weights, opt_v, opt_b) -> dict:
        cfg, device = self.cfg, soft.v.device
        fingerprint, start = self._fingerprint(soft.layers), 0
        history: list[tuple[int, float]] = []
        if cfg.resume:
            state = load_checkpoint(cfg.checkpoint_dir, CHECKPOINT, fingerprint)
            soft.load_state_dict(state["soft"])
            opt_v.load_state_dict(state["opt_v"])
            opt_b.load_state_dict(state["opt_b"])
            start, history = state["step"], state["history"]
        log_every = max(cfg.iterations // 100, 1)
        t0 = t1 = time.perf_counter()
        bar = tqdm(
            range(start, cfg.iterations),
            initial=start,
            total=cfg.iterations,
            desc="rounding",
            unit="it",
            disable=not self.progress,
        )
        for step in bar:
            idx = batch_indices(len(images), cfg.batch_size, step, cfg.seed)
            x = _as_model_wants(images[idx.to(images.device)].to(device, non_blocking=True), cfg)
            soft.refresh()
            loss = self._losses(student, targets, idx, x, weights)
            beta = beta_at(step, cfg)
            total = loss if beta is None or cfg.reg == 0 else loss + cfg.reg * soft.regularizer(beta)
            opt_v.zero_grad(set_to_none=True)
            opt_b.zero_grad(set_to_none=True)
            total.backward()
            opt_v.step()
            opt_b.step()
            if step % log_every == 0 or step == cfg.iterations - 1:  # the host syncs of the loop (and the next)
                history.append((step, float(loss.detach())))
                bar.set_postfix(loss=f"{history[-1][1]:.4g}", beta="warm-up" if beta is None else f"{beta:.1f}")
            if step == start:  # the first step pays for compiling and warming up: time the rest apart
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t1 = time.perf_counter()
            if cfg.checkpoint_dir and ((step + 1) % cfg.checkpoint_every == 0 or step == cfg.iterations - 1):
                save_checkpoint(
                    cfg.checkpoint_dir,
                    CHECKPOINT,
                    {
                        "fingerprint": fingerprint,
                        "step": step + 1,
                        "soft": soft.state_dict(),
                        "opt_v": opt_v.state_dict(),
                        "opt_b": opt_b.state_dict(),
                        "history": history,
                    },
                )
        bar.close()
        steps = cfg.iterations - start
        t_end = time.perf_counter()
        seconds = t_end - t0
        return {
            "iterations": cfg.iterations,
            "resumed_at": start,
            "batch_size": cfg.batch_size,
            "images": len(images),
            "seconds": seconds,
            "seconds_per_step": seconds / steps if steps else None,
            "seconds_per_step_after_first": (t_end - t1) / (steps - 1) if steps > 1 else None,
            "loss_weights": cfg.loss_weights.value,
            "history": history,
        }

    @torch.no_grad()
    def _keep_best(self, layers, rtn, student, targets, images, weights) -> dict:
        """Distillation loss of the hard-rounded model vs RTN on fixed calibration images; keep the lower."""
        x = images[: min(len(images), 128)]
        device = weights.device

        def loss() -> float:
            return sum(
                float(self._losses(student, targets, idx, _as_model_wants(x[idx].to(device), self.cfg), weights))
                for idx in torch.arange(len(x)).split(self.cfg.batch_size)
            )

        eptq = loss()
        chosen = [(qw.layer.weight.detach().clone(), qw.ensure_bias().detach().clone()) for qw in layers]
        _load_weights(layers, rtn)
        rtn_loss = loss()
        if eptq <= rtn_loss:
            _load_weights(layers, chosen)
        return {"check_loss": eptq, "rtn_check_loss": rtn_loss, "kept": "eptq" if eptq <= rtn_loss else "rtn"}


def use_fused_act_quant_(gm: nn.Module, on: bool) -> None:
    """Activation quantizers on torch's fused training kernel (on) or the traceable formula (off, the default)."""
    for m in gm.modules():
        if isinstance(m, ActQuant):
            m.fused_kernel = on


def _as_model_wants(x: Tensor, cfg: RoundingConfig) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last and x.dim() == 4 else x


class _TeacherTargets:
    """The float graph's interest tensors for a batch, packed (fxq.distillation.pack): rows of an fp16 cache of
    every image, or recomputed. `workspace` is where the loss packs the student's, reused every step.

    The cache costs one float pass over the images and saves the teacher forward of every step; `auto` keeps it
    when the schedule sees each image at least once and it fits (8 GiB on CPU, 30 % of free GPU memory).
    """

    def __init__(self, teacher: GraphModule, images: Tensor, cfg: RoundingConfig, interest_names: list[str]):
        self.teacher, self.amp = teacher, cfg.amp
        self.nhwc = cfg.channels_last and images.dim() == 4
        self.cache: Tensor | None = None
        self.energy: Tensor | None = None  # with the cache: ||Z_f||^2 of every tensor for every image, [N, n]
        self.workspace = Workspace()
        # every tensor batch-first, or packing and the cache would mix images: a first dimension that follows the
        # batch from 1 to 2 images is the batch
        with torch.no_grad(), bf16_autocast(images.device, self.amp):
            outputs = {k: teacher(images[:k]) for k in sorted({1, min(2, len(images))})}
        self.out_is_tensor = isinstance(outputs[1][0], Tensor)  # the model output joins the loss when one tensor
        names = ["output"] * self.out_is_tensor + interest_names
        probes = {k: _flat(out, self.out_is_tensor) for k, out in outputs.items()}
        bad = [n for i, n in enumerate(names) if any(ts[i].dim() == 0 or len(ts[i]) != k for k, ts in probes.items())]
        if bad:
            raise GraphCheckFailed(
                f"rounding: tensors {bad[:3]} do not have the batch as their first dimension, and the loss compares "
                f"them image by image; make the model batch-first (e.g. nn.MultiheadAttention(batch_first=True))"
            )
        self.lengths = column_lengths(probes[max(probes)]).to(images.device)
        if cfg.teacher_cache == "off":
            return
        need = int(self.lengths.sum()) * 2 * len(images)
        on_gpu = images.device.type == "cuda"
        room = 0.3 * torch.cuda.mem_get_info(images.device)[0] if on_gpu else 8 * 2**30
        if cfg.teacher_cache == "on" and need > room:
            raise ConfigError(
                f"rounding: the teacher cache needs {need / 2**30:.1f} GiB, more than the {room / 2**30:.1f} GiB "
                f"allowed; use teacher_cache='off' (recompute) or fewer images"
            )
        if need <= room and (cfg.teacher_cache == "on" or cfg.iterations * cfg.batch_size >= len(images)):
            self.cache = torch.empty(len(images), int(self.lengths.sum()), dtype=torch.float16, device=images.device)
            self.energy = torch.empty(len(images), len(self.lengths), device=images.device)
            for start in range(0, len(images), 32):
                x = _as_model_wants(images[start : start + 32], cfg)
                z = pack(self._forward(x), self.nhwc)
                self.cache[start : start + len(x)].copy_(z)
                self.energy[start : start + len(x)] = row_energies(z, self.lengths)

    @torch.no_grad()
    def _forward(self, x: Tensor) -> list[Tensor]:
        with bf16_autocast(x.device, self.amp):
            return _flat(self.teacher(x), self.out_is_tensor)

    def __call__(self, idx: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Batch `idx` (images `x`): the packed targets and, from the cache, their energies per sample."""
        if self.cache is None:
            return pack(self._forward(x), self.nhwc), None
        idx = idx.to(self.cache.device)
        return self.cache[idx].to(x.device), self.energy[idx].mean(0).to(x.device)


def _flat(out, out_is_tensor: bool) -> list[Tensor]:
    """(output, z_1, ..., z_n) -> the tensors of the loss: the output too when it is one tensor."""
    return list(out) if out_is_tensor else list(out[1:])


@torch.no_grad()
def _load_weights(layers: list[QuantWeight], values: list[tuple[Tensor, Tensor]]) -> None:
    for qw, (w, b) in zip(layers, values):
        qw.layer.weight.copy_(w)
        qw.ensure_bias().copy_(b)
