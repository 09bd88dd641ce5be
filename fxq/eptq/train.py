"""EPTQ's rounding optimization, one knowledge distillation over the whole network (arXiv 2309.11531).

Every weight quantizer gets AdaRound variables V (soft weight s * clamp(floor(w/s) + h(V))), every
quantized layer's bias is trainable, activations stay quantized (their steps trained too with
`train_act_steps`: fxq.eptq.act_steps). All layers' V and biases are flat tensors
(fxq.eptq.soft_rounding) and the interest tensors travel packed (fxq.eptq.distillation), so a step's extra
kernels beyond the forward and backward number a few dozen, not some twenty per layer. The loss compares the
quantized graph's interest tensors with the float graph's on unlabeled images, weighted by the LFH (lambda_z),
plus the rounding regulariser lambda_reg * sum(1 - |2h - 1|^beta) with beta annealed 20 -> 2 after a warm-up with
the regulariser off. At the end every weight is rounded hard onto its grid.

Each tensor's squared error is taken relative to its float energy (as MCT does), so that tensors of very
different scales weigh by their lambda alone; the model output joins Z with the largest lambda.

Where the state of every layer at once would not fit in the memory free, the layers are cut, in graph order, into
groups that fit, and the groups are optimized one after the other on the same whole-network loss, each with its
share of the iterations and of the time budget, and hardened before the next begins; the layers of the groups to
come compute meanwhile at their start (round-to-nearest, or the layer-local choice).

After the layer-local start the first layers may stay at their choice (a frozen prefix, fxq.eptq.prefix): the steps
then run the graph from the quantized value past them, computed once per image; the keep-best check still runs the
whole graph.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import math
import time
from copy import deepcopy
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.fx import GraphModule
from tqdm.auto import tqdm

from fxq.config import Optimizer, RoundingConfig, Start
from fxq.data.subset import Subset, choose
from fxq.dist.world import World
from fxq.eptq.act_steps import ActSteps
from fxq.eptq.budget import PLAN_AFTER, REPLAN_SHARE, planned_iterations
from fxq.eptq.distillation import packed_loss, softmax_kl
from fxq.eptq.layerwise import Sensitivity, harden_choice_, sequential_choices, use_choice_
from fxq.eptq.prefix import Prefix, frozen_prefix, prefix_loss, returns_one_value, values_at
from fxq.eptq.schedule import batch_indices, beta_at, lr_rounding_at
from fxq.eptq.soft_rounding import SoftRounding
from fxq.eptq.teacher import TeacherTargets, as_model_wants, bf16_autocast, flat_outputs
from fxq.eptq.weights import interest_weights
from fxq.errors import CheckpointError, ConfigError, GraphCheckFailed
from fxq.io.checkpoint import (
    Measured,
    check_fingerprint,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    tensor_digest,
)
from fxq.ir.graph import nodes_by_name
from fxq.ir.meta import Deadline
from fxq.ir.ops import channels_last_, device_of, set_eval_
from fxq.ir.taps import from_cut, interest_nodes, quantized_value, up_to, with_taps
from fxq.memory import available_bytes, keeps_freed_memory, size_text
from fxq.quant.modules import ActQuant, QuantWeight

__all__ = ["RoundingOptimizer", "use_training_kernels_", "check_resumable", "schedule_fields", "CHECKPOINT"]

CHECKPOINT = "rounding.pt"
_CHECK_IMAGES = 128  # calibration images of the keep-best check
CHECK_MARGIN = 1.25  # the budget's reserve for the keep-best check: its timed batches and a quarter more
# probes per image of the layer-local start's position weights (RoundingConfig.start_sensitivity)
_SENSITIVITY_PROBES = 4
_START_BATCH = 32  # images per batch of the layer-local start (forwards, no backward: the batch can be large)
# what the optimization takes per quantized weight at a step's peak (the soft-rounding state, the optimizer's, a
# step's soft weights and their gradients), measured with bench/rounding_memory.py and rounded up: by the memory
# it holds live, and with freed memory kept in the process (fxq.keep_freed_memory), where the heap's high-water
# mark and its fragments count too
_BYTES_PER_WEIGHT = {False: 72, True: 128}
_GROUP_SHARE = 0.5  # of the free memory, the most a group's state may take when the layers are optimized in groups
_PREFIX_ROOM = 0.25  # of the free memory, the most the values at a frozen prefix's end may take (8 GiB where unknown)
_HELD_PER_WEIGHT = 6  # bytes per weight of every layer held beside a group's state: the quantized weights a step's
# backward keeps (fp32), and the integer codes of round-to-nearest and of the result (the keep-best check's copies)
# settings a resumed run may change: where and how often it checkpoints, how it keeps the teacher's tensors
_RESUMABLE_ACROSS = ("checkpoint_every", "checkpoint_dir", "resume", "teacher_cache")


@dataclasses.dataclass(frozen=True)
class _Kept:
    """The keep-best check: the mean loss of the trained rounding and of the fallback, and which was kept."""

    trained: float
    fallback: float
    trained_kept: bool
    seconds: float


class RoundingOptimizer:
    """Optimize the rounding of every quantized weight (and the biases) of a graph against the float `teacher`."""

    def __init__(
        self,
        teacher: GraphModule,
        images: Tensor,
        config: RoundingConfig = RoundingConfig(),
        progress=True,
        deadline: Deadline | None = None,
        world: World = World(),
    ):
        if config.batch_size < world.size:
            raise ConfigError(
                f"rounding: a batch of {config.batch_size} images cannot be shared by {world.size} ranks; use a "
                f"batch size of at least the number of ranks"
            )
        self.teacher = teacher
        idx, self.chosen = choose(len(images), Subset(config.images, seed=config.seed))
        self.images = images if config.images is None else images[idx.to(images.device)]
        if config.check_apart and len(self.images) <= _CHECK_IMAGES:
            raise ConfigError(
                f"rounding: check_apart keeps the check's {_CHECK_IMAGES} images out of the fit, and only "
                f"{len(self.images)} are given; give more calibration images or leave check_apart off"
            )
        self.cfg = config
        self.progress = progress and world.main
        self.deadline = deadline  # the run's time budget: the iteration count is planned to end inside it
        # data-parallel: every rank takes its part of each batch and the gradients are summed over the ranks, so
        # each step is one process's step on the whole batch; rank 0 alone writes checkpoints
        self.world = world
        self._check_batch_seconds = 0.0  # one batch of the keep-best check, timed before the steps (with a budget)
        self._drop: torch.Generator | None = None  # QDrop's draws (act_drop), seeded at every step

    @torch.enable_grad()  # it trains, whatever grad mode the caller is in (torch.compile's may be off)
    def run(self, gm: GraphModule) -> dict:
        """Optimize, harden (or keep RTN where it distils better) and return the run's statistics."""
        cfg, device = self.cfg, device_of(gm)
        set_eval_(gm)
        layers = [m for m in gm.modules() if isinstance(m, QuantWeight)]
        images = self.images.to(device) if device.type == "cuda" else self.images
        images, check_images = self._split(images)
        prefix = self._prefix(gm, images)
        frozen = {id(qw) for qw in prefix.layers} if prefix is not None else set()
        groups = _layer_groups([qw for qw in layers if id(qw) not in frozen], device, self.world)
        nhwc = cfg.channels_last and self.images.dim() == 4
        student, teacher = self._tapped(gm)
        trainable = {p: p.requires_grad for p in gm.parameters()}
        for p in trainable:
            p.requires_grad_(False)
        rtn = [qw.hardened_state() for qw in layers]  # integer codes: round-to-nearest's weights exactly, in a quarter
        acts = ActSteps([m for m in gm.modules() if isinstance(m, ActQuant)]) if cfg.train_act_steps else None
        try:  # everything set up from here on is undone in `finally`
            use_training_kernels_(gm, True)
            if nhwc:  # before V is made from the weights, so V and its gradients are NHWC too
                channels_last_(gm)
                channels_last_(self.teacher)
            t0 = time.perf_counter()
            # a resumed run takes V from its checkpoint, but the groups not begun yet (and a frozen prefix) start
            # where they would have
            layerwise = cfg.start is Start.LAYERWISE and (not cfg.resume or len(groups) > 1 or prefix is not None)
            prefix_stats = None
            if layerwise and prefix is not None and cfg.prefix_steps > 0:
                # the prefix chosen, trained alone and hardened first: the layers past it choose on its values
                first = self._layerwise(gm, prefix.layers, images)
                prefix_stats = self._train_prefix(gm, prefix, images, check_images, first)
                rest = [qw for qw in layers if id(qw) not in frozen]
                chosen = dict(zip(map(id, prefix.layers), first)) | dict(
                    zip(map(id, rest), self._layerwise(gm, rest, images))
                )
                start = [chosen[id(qw)] for qw in layers]
            else:
                start = self._layerwise(gm, layers, images) if layerwise else None
            start_seconds = time.perf_counter() - t0
            if start is not None:
                for qw, choice in zip(layers, start):
                    if id(qw) in frozen:  # for good (a trained prefix is hard already)
                        if prefix_stats is None:
                            harden_choice_(qw, choice)
                    elif len(groups) > 1 and choice is not None:  # the groups to come compute at their start
                        use_choice_(qw, choice)
            t0 = time.perf_counter()
            if prefix is None:  # the steps and the keep-best check on the whole graph
                names = [n.name for n in interest_nodes(gm)]
                targets = TeacherTargets(teacher, images, cfg, names, self.world)
                weights = interest_weights(gm, cfg.loss_weights_read, targets.out_is_tensor, cfg.output_share).to(
                    device
                )
                steps = check = (student, targets, _Inputs(images), weights)
                if cfg.check_apart:
                    check = self._check(student, teacher, check_images, names, weights)
            else:  # the steps from the values at the cut; the check on the whole graph (RTN's prefix differs)
                steps, check, past = self._past_prefix(gm, prefix, images, check_images, student, teacher)
            cache_seconds = time.perf_counter() - t0
            if cfg.output_kl and not steps[1].out_is_tensor:  # steps[1]: the steps' TeacherTargets
                raise ConfigError(
                    "output_kl compares the model output's softmax, but this model does not return one tensor of "
                    "class scores; leave output_kl at 0"
                )
            if cfg.keep_best and self.deadline is not None:
                self._check_batch_seconds = self._time_check_batch(*check)
            if cfg.act_drop > 0:
                self._drop = torch.Generator(device=device)
                use_act_drop_(gm, (cfg.act_drop, self._drop))
            stats = self._optimize_groups(gm, layers, groups, start, acts, *steps)
            if acts is not None:
                acts.harden_()
                stats.update(acts.summary())
            stats.update(teacher_cache=steps[1].cache is not None, teacher_cache_seconds=cache_seconds)
            stats.update(start=cfg.start.value, start_seconds=start_seconds if start is not None else None)
            if start is not None:
                stats.update(
                    start_sensitivity=cfg.start_sensitivity, start_aim=cfg.start_aim, start_sweeps=cfg.start_sweeps
                )
            stats.update(frozen_prefix=past if prefix is not None else None)
            if prefix_stats is not None:
                stats["frozen_prefix"]["trained"] = prefix_stats
            if cfg.keep_best:
                best = self._keep_best(layers, rtn, acts, *check)
                stats.update(
                    check_loss=best.trained,
                    rtn_check_loss=best.fallback,
                    kept="eptq" if best.trained_kept else "rtn",
                    check_seconds=best.seconds,
                )
            if self.deadline is not None:
                stats.update(time_budget_s=self.deadline.seconds, seconds_left_in_budget=self.deadline.left())
        finally:
            for qw in layers:  # the groups a failure left at their start
                qw.live = None
            if acts is not None:
                acts.close()
            for p, flag in trainable.items():
                p.requires_grad_(flag)
            use_training_kernels_(gm, False)
            use_act_drop_(gm, None)
            if nhwc:
                gm.to(memory_format=torch.contiguous_format)
                self.teacher.to(memory_format=torch.contiguous_format)
        return stats

    @torch.no_grad()
    def _layerwise(self, gm: GraphModule, layers: list[QuantWeight], images: Tensor) -> list[Tensor | None]:
        """Each of `layers`' layer-local rounding choice (fxq.eptq.layerwise), made in graph order on `start_images`
        images drawn with the schedule's seed (or all of them), each rank on its share of the batches; the graph's
        other layers compute as they are."""
        device = device_of(gm)
        drawn = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.cfg.seed))
        mine = [
            (k, idx) for k, idx in enumerate(drawn[: self.cfg.start_images].split(_START_BATCH)) if self.world.owns(k)
        ]
        batches = [as_model_wants(images[idx.to(images.device)].to(device), self.cfg) for _, idx in mine]
        seeds = tuple(self.cfg.seed * 1_000_003 + k for k, _ in mine)  # batch k's probes, on whichever rank
        sensitivity = Sensitivity(self.cfg.start_sensitivity, _SENSITIVITY_PROBES, seeds)
        teacher = self.teacher.to(device)
        aim, sweeps = self.cfg.start_aim, self.cfg.start_sweeps
        return sequential_choices(gm, teacher, layers, batches, self.world, sensitivity, aim, sweeps)

    def _prefix(self, gm: GraphModule, images: Tensor) -> Prefix | None:
        """The frozen prefix of this run (fxq.eptq.prefix): with the layer-local start and steps after it, where
        the values at its end for every image fit in _PREFIX_ROOM of the free memory."""
        cfg = self.cfg
        if cfg.start is not Start.LAYERWISE or cfg.iterations == 0 or cfg.frozen_share == 0:
            return None
        prefix = frozen_prefix(gm, cfg.frozen_share)
        if prefix is None:
            return None
        with torch.no_grad():
            probe = up_to(gm, prefix.cut)(as_model_wants(images[:2].to(device_of(gm)), cfg))
        free = available_bytes(images.device)
        room = _PREFIX_ROOM * free if free is not None else 8 * 2**30
        # its value is kept per image: a tensor with the batch first, of a size that fits
        batch_first = isinstance(probe, Tensor) and probe.dim() > 0 and len(probe) == min(2, len(images))
        per_image = probe[0].numel() * 4 if batch_first else None
        unfit = per_image is None or len(images) * per_image > room
        return prefix if not self.world.any(unfit, "the frozen prefix's size") else None

    def _split(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The images the rounding fits and the keep-best check's (the first _CHECK_IMAGES): with check_apart, the
        fit leaves the check's out."""
        check = images[: min(len(images), _CHECK_IMAGES)]
        return (images[len(check) :] if self.cfg.check_apart else images), check

    def _check(self, student, teacher, images: Tensor, names: list[str], weights: Tensor) -> tuple:
        """The keep-best check's (student, targets, inputs, weights) on `images`, with the teacher's tensors of
        them cached."""
        cached = dataclasses.replace(self.cfg, teacher_cache="on")
        return student, TeacherTargets(teacher, images, cached, names, self.world), _Inputs(images), weights

    def _past_prefix(
        self, gm, prefix: Prefix, images: Tensor, check_images: Tensor, student, teacher
    ) -> tuple[tuple, tuple, dict]:
        """The steps' (student, targets, inputs, weights) past the frozen `prefix`, whose layers are hard now: the
        student from the cut, the teacher's tensors past it, the cut's value for every image, and the weights of the
        tensors kept, scaled so that the loss is the whole graph's less its constant terms. Also the keep-best
        check's on the whole graph (`student`, `teacher`: tapped at every interest tensor), with the teacher's
        tensors of the check's images cached, and what the prefix left out and cost."""
        cfg, device = self.cfg, device_of(gm)
        t0 = time.perf_counter()
        at_cut = values_at(gm, prefix.cut, images, _START_BATCH, lambda x: as_model_wants(x.to(device), cfg))
        seconds = time.perf_counter() - t0
        z = interest_nodes(gm)
        kept = [z[k] for k in prefix.kept]
        by_name = nodes_by_name(self.teacher)
        past = from_cut(gm, prefix.cut, [quantized_value(n) for n in kept])
        past_teacher = with_taps(self.teacher, [by_name[n.name] for n in kept])
        if cfg.compile:
            past, past_teacher = torch.compile(past), torch.compile(past_teacher)
        targets = TeacherTargets(past_teacher, images, cfg, [n.name for n in kept], self.world)
        out = targets.out_is_tensor
        weights = interest_weights(gm, cfg.loss_weights_read, out, cfg.output_share).to(device)
        rows = [0] * out + [k + out for k in prefix.kept]
        steps = (past, targets, _Inputs(images, at_cut), weights[rows] * (len(rows) / len(weights)))
        check = self._check(student, teacher, check_images, [n.name for n in z], weights) if cfg.keep_best else None
        left_out = {"layers": len(prefix.layers), "weight_share": prefix.weight_share, "tensors": len(z) - len(kept)}
        return steps, check, {**left_out, "cut": prefix.cut.name, "seconds": seconds}

    def _train_prefix(
        self, gm: GraphModule, prefix: Prefix, images: Tensor, check_images: Tensor, start: list[Tensor | None]
    ) -> dict:
        """`prefix_steps` steps of the frozen prefix's layers alone from their layer-local `start`, through the
        prefix alone, on its own loss (fxq.eptq.prefix.prefix_loss), then hardened; the steps' statistics."""
        cfg, device = self.cfg, device_of(gm)
        one_output = returns_one_value(gm)
        weights = interest_weights(gm, cfg.loss_weights_read, one_output, cfg.output_share).to(device)
        loss = prefix_loss(gm, prefix, weights, one_output)
        by_name = nodes_by_name(self.teacher)
        student = up_to(gm, loss.taps[0], loss.taps[1:])
        sources = [by_name[name] for name in loss.sources]
        teacher = up_to(self.teacher.to(device), sources[0], sources[1:])
        # the first of the tensors stands as the "output" of this graph: it is one tensor
        targets = TeacherTargets(
            teacher, images, dataclasses.replace(cfg, iterations=cfg.prefix_steps), loss.sources[1:], self.world
        )
        # the start as it would harden, for the check at the end: on copies, the layers keep their float weights
        start_states = [_hardened_copy(qw, choice).hardened_state() for qw, choice in zip(prefix.layers, start)]
        soft = SoftRounding(prefix.layers, cfg.train_scale)
        try:
            soft.start_from_(start, cfg.start_confidence)
            stats = self._optimize(  # the prefix's loss has no model output to compare
                soft, None, student, targets, _Inputs(images), loss.weights, cfg.prefix_steps, None, 0, None, None, 0.0
            )
            soft.harden_()
        finally:
            soft.close()
        # the trained prefix or its start, whichever leaves the prefix's loss lower on the check's images
        check = TeacherTargets(teacher, check_images, cfg, loss.sources[1:], self.world)
        best = self._keep_best(prefix.layers, start_states, None, student, check, _Inputs(check_images), loss.weights)
        history = stats.pop("history")
        return {
            **stats,
            "loss_first": history[0][1],
            "loss_last": history[-1][1],
            "check_loss": best.trained,
            "start_check_loss": best.fallback,
            "kept": "trained" if best.trained_kept else "start",
        }

    def _tapped(self, gm: GraphModule) -> tuple[GraphModule, GraphModule]:
        z = interest_nodes(gm)
        by_name = nodes_by_name(self.teacher)
        missing = [n.name for n in z if n.name not in by_name]
        if missing:
            raise GraphCheckFailed(f"rounding: the teacher graph lacks interest tensors {missing[:3]}")
        student = with_taps(gm, [quantized_value(n) for n in z])
        teacher = with_taps(self.teacher.to(device_of(gm)), [by_name[n.name] for n in z])
        if self.cfg.compile:
            student, teacher = torch.compile(student), torch.compile(teacher)
        return student, teacher

    def _fingerprint(self, gm: GraphModule, layers: list[QuantWeight], groups: list[list], weights: Tensor) -> dict:
        """Everything that changes what the optimization computes, as named fields: the float weights, the
        calibration images, each quantizer's grid and step, the groups of layers, the loss weights and every
        setting of the schedule."""
        acts = [m for m in gm.modules() if isinstance(m, ActQuant)]
        return {
            "model_weights": tensor_digest(self.teacher.state_dict().values()),
            "calibration_images": f"{len(self.images)} images, {tensor_digest([self.images])}",
            "weight_bits": [qw.spec.bits for qw in layers],
            "weight_grids": tensor_digest([torch.tensor([qw.spec.qmin, qw.spec.qmax]) for qw in layers]),
            "act_bits": [m.spec.bits for m in acts],
            # steps and loss weights are measured, not given: another float environment (thread count, number of
            # ranks, machine) moves them in the last bits, so they are compared to a tolerance
            "act_steps": Measured(torch.stack([m.scale.float() for m in acts]).tolist() if acts else []),
            "weight_steps": Measured(torch.cat([qw.scale.float().reshape(-1) for qw in layers]).tolist()),
            "interest_weights": Measured(weights.tolist()),
            "layer_groups": [len(group) for group in groups],
            **schedule_fields(self.cfg),
            "state": "flat",  # SoftRounding's flat V, biases and factors (earlier checkpoints held them per layer)
        }

    def _losses(
        self, student, targets: TeacherTargets, batch: Tensor, xs: tuple, weights: Tensor, output_kl: float = 0.0
    ) -> Tensor:
        """The loss of the images `batch`, of which `xs` is this rank's part (the teacher's input and the student's
        arguments, _Inputs.take): its share of the batch's loss (the whole loss alone), so that the ranks' shares
        and their gradients add up to one process's. With `output_kl`, plus that weight times the output's KL."""
        x, args = xs
        zf, zf_energy = targets(batch, x)
        if len(x) == 0:  # a part of a short batch (the keep-best check's last): a share of nothing
            return weights.new_zeros(weights.shape[:-1])
        with bf16_autocast(x.device, self.cfg.amp):
            zq = flat_outputs(student(*args), targets.out_is_tensor)
        cfg = self.cfg
        loss = packed_loss(
            zf, zq, targets.lengths, weights, cfg.normalize_loss, zf_energy, targets.nhwc, targets.workspace, len(batch)
        )
        if output_kl:  # the output comes first among the packed tensors (TeacherTargets)
            loss = loss + output_kl * softmax_kl(zf[:, : int(targets.lengths[0])], zq[0], len(batch))
        return loss

    def _optimize_groups(self, gm, layers, groups, start, acts, student, targets, images, weights) -> dict:
        """Each group of layers optimized in turn from its start (`start`: the layer-local choices, or None) and
        hardened; a resumed run hardens the groups its checkpoint finished and continues the one it was in. The
        activation steps (`acts`, or None) train beside every group."""
        cfg = self.cfg
        # hashing the weights and images costs a pass over them: only a run that checkpoints needs it
        fingerprint = self._fingerprint(gm, layers, groups, weights) if cfg.checkpoint_dir else None
        resumed = self._resume_state(fingerprint) if cfg.resume else None
        first, parts = (resumed.get("group", 0), resumed.get("parts", [])) if resumed is not None else (0, [])
        for qw, hard in zip((qw for group in groups[:first] for qw in group), resumed["done"] if first else []):
            qw.load_hardened_(hard)
        index = {qw: i for i, qw in enumerate(layers)}
        share = math.ceil(cfg.iterations / len(groups))  # every group takes a step when any is asked
        for g in range(first, len(groups)):
            soft = SoftRounding(groups[g], cfg.train_scale)
            try:
                if start is not None:
                    soft.start_from_([start[index[qw]] for qw in groups[g]], cfg.start_confidence)
                deadline = self.deadline.share(len(groups) - g) if self.deadline is not None else None
                # a checkpoint of group g also holds the finished groups: their hard layers and statistics
                done = [qw.hardened_state() for group in groups[:g] for qw in group] if cfg.checkpoint_dir else []
                saved = {"fingerprint": fingerprint, "group": g, "done": done, "parts": parts}
                state = resumed if g == first else None
                sides = soft.sides()  # the start's rounding (a resumed group's too: its state loads later)
                parts.append(
                    self._optimize(
                        soft, acts, student, targets, images, weights, share, deadline, g * share, state, saved
                    )
                )
                parts[-1]["weights_changed"], parts[-1]["weights_free"] = soft.changed_since(sides)
                soft.harden_()
            finally:
                soft.close()
        stats = _merged(parts) if len(parts) > 1 else parts[0]
        # what the steps changed: the share of the weights with a choice that round otherwise than they started
        # (round-to-nearest, or the layer-local choice); a resumed run counts from the start, not the checkpoint
        changed = stats["weights_changed"] / max(stats["weights_free"], 1)
        return {**stats, "rounding_changed": changed, "groups": [len(group) for group in groups]}

    def _optimizers(
        self, soft: SoftRounding, acts: ActSteps | None
    ) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        """The optimizer of the rounding variables (and activation steps) and the SGD of the biases (and step
        factors)."""
        cfg = self.cfg
        soft.bias.requires_grad_(cfg.train_bias)
        adam = torch.optim.Adam if cfg.optimizer is Optimizer.ADAM else torch.optim.RAdam
        groups = [{"params": [soft.bias], "lr": cfg.lr_bias}]
        if soft.scale_factor is not None:
            groups.append({"params": [soft.scale_factor], "lr": cfg.lr_scale})
        adaptive = [{"params": [soft.v]}]
        if acts is not None:
            adaptive.append({"params": [acts.log_factor], "lr": cfg.lr_act_steps})
        return adam(adaptive, lr=cfg.lr_rounding), torch.optim.SGD(groups, foreach=True)

    def _optimize(
        self,
        soft: SoftRounding,
        acts: ActSteps | None,
        student,
        targets,
        images,
        weights,
        iterations: int,
        budget: Deadline | None,
        offset: int,
        state: dict | None,
        saved: dict | None,
        output_kl: float | None = None,
    ) -> dict:
        """`iterations` steps of `soft`'s layers and `acts` (fewer to end inside `budget`), the batches those of
        the steps from `offset` on; continued from the checkpoint `state` when given. Each checkpoint holds `saved`
        too (None: no checkpoints). `output_kl`: the weight of the output's KL in each step's loss (None: the
        config's)."""
        cfg, device = self.cfg, soft.v.device
        output_kl = cfg.output_kl if output_kl is None else output_kl
        opt_v, opt_b = self._optimizers(soft, acts)
        trained = [*soft.parameters(), *([acts.log_factor] if acts is not None else [])]
        start, planned = 0, iterations  # planned: the iteration count, shortened to fit a time budget
        history: list[tuple[int, float]] = []
        if state is not None:
            soft.load_state_dict(state["soft"])
            if acts is not None:
                acts.load_state_dict(state["acts"])
            opt_v.load_state_dict(state["opt_v"])
            opt_b.load_state_dict(state["opt_b"])
            start, history = state["step"], state["history"]
            planned = state.get("planned", iterations)
        plan_at = start + PLAN_AFTER if budget is not None else None
        limit = planned  # a plan never goes past the schedule it was given
        reserve = 0.0
        if budget is not None and budget.left() <= 0:
            planned = start  # the budget was spent before the rounding began: RTN (or the checkpoint) as is
        sched = dataclasses.replace(cfg, iterations=planned)  # the schedule (beta) follows the planned length
        log_every = max(planned // 100, 1)
        t0 = t1 = time.perf_counter()
        bar = tqdm(total=planned, initial=start, desc="rounding", unit="it", disable=not self.progress)
        step, w = start, self.world
        while step < planned:
            batch = batch_indices(len(images), cfg.batch_size, offset + step, cfg.seed)
            xs = images.take(batch[w.part(len(batch))], device, cfg)
            if self._drop is not None:  # a step's draws depend on the step alone: a resumed run draws the same
                self._drop.manual_seed((cfg.seed * 1_000_003 + offset + step) * w.size + w.rank)
            soft.refresh()
            if acts is not None:
                acts.refresh()
            loss = self._losses(student, targets, batch, xs, weights, output_kl)
            beta = beta_at(step, sched)
            opt_v.param_groups[0]["lr"] = lr_rounding_at(step, sched)
            # the regulariser does not depend on the images: one rank adds it, so the sum over ranks holds it once
            regularized = beta is not None and cfg.reg != 0 and w.main
            total = loss + cfg.reg * soft.regularizer(beta) if regularized else loss
            opt_v.zero_grad(set_to_none=True)
            opt_b.zero_grad(set_to_none=True)
            total.backward()
            _sum_gradients_(trained, w)
            opt_v.step()
            opt_b.step()
            if step % log_every == 0 or step == planned - 1:  # the host syncs of the loop (and the next)
                history.append((offset + step, float(w.sum_(loss.detach().reshape(1), "the rounding's loss"))))
                bar.set_postfix(loss=f"{history[-1][1]:.4g}", beta="warm-up" if beta is None else f"{beta:.1f}")
            if step == start:  # the first step pays for compiling and warming up: time the rest apart
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t1 = time.perf_counter()
                window_left, window = (budget.left(), PLAN_AFTER - 1) if budget is not None else (None, 0)
            if step + 1 == plan_at:  # time a window of steps, then fit the schedule into what is left of the budget
                now = budget.left()
                # every rank plans alike: for the slowest rank's steps and check batch and the least time left
                slowest = w.max_(
                    torch.tensor([(window_left - now) / window, -now, self._check_batch_seconds], dtype=torch.float64),
                    "the time budget",
                )
                per_step, left, check_batch = float(slowest[0]), -float(slowest[1]), float(slowest[2])
                # the end: two steps' time and the check's batches, each timed, and at least a step's forward (a
                # third of a step); past a frozen prefix a check batch, through the whole graph, can cost more than
                # a step. The check batch was timed once, before the steps: CHECK_MARGIN for a machine slowed since
                check = self._check_batches(len(images)) * max(per_step / 3, check_batch) * CHECK_MARGIN
                reserve = per_step * 2 + check
                planned = planned_iterations(step + 1, limit, left, per_step, reserve)
                last_left = window_left = left
                # the next window doubles what has run, up to REPLAN_SHARE of the length, and is timed on its own:
                # the plan follows the machine's pace to the end, when it speeds up as when it slows
                window = min(step + 1 - start, max(math.ceil(REPLAN_SHARE * planned), PLAN_AFTER - 1))
                if step + 1 + window < planned:
                    plan_at = step + 1 + window
                sched = dataclasses.replace(cfg, iterations=planned)
                log_every = max(planned // 100, 1)
                bar.total = planned
                bar.refresh()
            elif reserve > 0:  # planned once: one more step like the last would cut the reserve
                left = budget.left()
                if w.any(2 * left - last_left < reserve, "the time budget"):  # late (the machine slowed): harden
                    planned = bar.total = min(planned, step + 1)
                last_left = left
            step += 1
            bar.update(1)
            due = step % cfg.checkpoint_every == 0 or step == planned
            if saved is not None and cfg.checkpoint_dir and due and w.main:
                save_checkpoint(
                    cfg.checkpoint_dir,
                    CHECKPOINT,
                    {
                        **saved,
                        "step": step,
                        "planned": planned,
                        "soft": soft.state_dict(),
                        "acts": acts.state_dict() if acts is not None else None,
                        "opt_v": opt_v.state_dict(),
                        "opt_b": opt_b.state_dict(),
                        "history": history,
                    },
                )
        bar.close()
        steps = planned - start
        t_end = time.perf_counter()
        seconds = t_end - t0
        return {
            "iterations": planned,
            "iterations_limit": iterations,
            "resumed_at": offset + start if state is not None else 0,  # the run's step it resumed at
            "batch_size": cfg.batch_size,
            "images": len(images),
            "images_chosen": self.chosen,
            "seconds": seconds,
            "seconds_per_step": seconds / steps if steps else None,
            "seconds_per_step_after_first": (t_end - t1) / (steps - 1) if steps > 1 else None,
            "loss_weights": cfg.loss_weights_read.value,
            "output_share": cfg.output_share,
            "act_drop": cfg.act_drop,
            "history": history,
        }

    def _resume_state(self, fingerprint: dict) -> dict:
        """The checkpoint to resume from, checked against this run: read by rank 0 (the one that writes them,
        whose file system has it) and sent to the others."""
        w = self.world
        if w.solo:
            return load_checkpoint(self.cfg.checkpoint_dir, CHECKPOINT, fingerprint)
        data = b""
        if w.main:
            try:
                buf = io.BytesIO()
                torch.save(load_checkpoint(self.cfg.checkpoint_dir, CHECKPOINT, fingerprint), buf)
                data = buf.getvalue()
            finally:  # a refused checkpoint still answers the others (with nothing), so they stop too
                data = w.broadcast_bytes(data, "the checkpoint's broadcast")
            return torch.load(io.BytesIO(data), weights_only=True)
        data = w.broadcast_bytes(None, "the checkpoint's broadcast")
        if not data:
            raise CheckpointError(f"rank {w.rank}: rank 0 could not resume from its checkpoint; its error says why")
        return torch.load(io.BytesIO(data), weights_only=True)

    @torch.no_grad()
    def _time_check_batch(self, student, targets, images, weights) -> float:
        """Seconds of one batch of the keep-best check on the run's clock, the second of two (the first pays for
        warming up)."""
        batch = torch.arange(min(len(images), self.cfg.batch_size))
        xs = images.take(batch[self.world.part(len(batch))], weights.device, self.cfg)
        seconds = 0.0
        for _ in range(2):
            before = self.deadline.left()
            self._losses(student, targets, batch, xs, weights)
            if weights.device.type == "cuda":  # its kernels done, not only launched
                torch.cuda.synchronize(weights.device)
            seconds = before - self.deadline.left()
        return seconds

    def _check_batches(self, n_images: int) -> int:
        """Forward batches the end of a run costs (the keep-best check of the EPTQ and the RTN weights); each
        costs at least a third of a step (a forward, no backward), and past a frozen prefix more."""
        return 2 * math.ceil(min(n_images, _CHECK_IMAGES) / self.cfg.batch_size) if self.cfg.keep_best else 0

    @torch.no_grad()
    def _keep_best(self, layers, fallback, acts, student, targets, images, weights) -> _Kept:
        """Distillation loss of the hard-rounded `layers` (with their learned activation steps, `acts`) vs their
        `fallback` rounding (RTN's, or a start's; with calibration's steps) on fixed calibration images, the mean
        over them (whatever the batch size); keep the lower."""
        n = min(len(images), _CHECK_IMAGES)
        device, w = weights.device, self.world

        def loss() -> float:
            total = 0.0
            for batch in torch.arange(n).split(self.cfg.batch_size):
                xs = images.take(batch[w.part(len(batch))], device, self.cfg)
                total += float(self._losses(student, targets, batch, xs, weights)) * len(batch)
            return float(w.sum_(torch.tensor([total], dtype=torch.float64), "the keep-best check")) / n

        t0 = time.perf_counter()
        trained = loss()
        chosen = [qw.hardened_state() for qw in layers]  # its integer codes: a quarter of the weights' memory
        for qw, hard in zip(layers, fallback):
            qw.load_hardened_(hard)
        if acts is not None:
            acts.use_start_()
        fallback_loss = loss()
        keep_trained = trained <= fallback_loss
        if keep_trained:
            for qw, hard in zip(layers, chosen):
                qw.load_hardened_(hard)
            if acts is not None:
                acts.harden_()
        return _Kept(trained, fallback_loss, keep_trained, time.perf_counter() - t0)


@dataclasses.dataclass
class _Inputs:
    """What the steps read per image: the image (the teacher's input) and, past a frozen prefix, the quantized
    graph's value at the prefix's end (the student's input), computed once."""

    images: Tensor
    at_cut: Tensor | None = None

    def __len__(self) -> int:
        return len(self.images)

    def take(self, idx: Tensor, device: torch.device, cfg: RoundingConfig) -> tuple[Tensor, tuple[Tensor, ...]]:
        """The images `idx` for the teacher, and the student's arguments for them (the images, or the values at
        the cut and the images: fxq.ir.taps.from_cut), on `device` in the graph's memory format."""

        def rows(t: Tensor) -> Tensor:
            return as_model_wants(t[idx.to(t.device)].to(device, non_blocking=True), cfg)

        x = rows(self.images)
        return x, (x,) if self.at_cut is None else (rows(self.at_cut), x)


def _hardened_copy(qw: QuantWeight, choice: Tensor | None) -> QuantWeight:
    """A copy of the layer hardened at its layer-local `choice`; the layer itself untouched."""
    copy = deepcopy(qw)
    harden_choice_(copy, choice)
    return copy


def _sum_gradients_(params: list[Tensor], world: World) -> None:
    """Each gradient summed over the ranks, in one bucket (one all-reduce per step)."""
    grads = [p.grad for p in params if p.grad is not None]
    if world.solo or not grads:
        return
    bucket = world.sum_(torch.cat([g.reshape(-1) for g in grads]), "the rounding's gradient all-reduce")
    for g, part in zip(grads, bucket.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def schedule_fields(cfg: RoundingConfig) -> dict:
    """The settings of a rounding run that a resumed run must share, as plain values."""
    out = {}
    for f in dataclasses.fields(cfg):
        if f.name not in _RESUMABLE_ACROSS:
            v = getattr(cfg, f.name)
            out[f.name] = v.value if isinstance(v, enum.Enum) else v
    return out


def _layer_groups(layers: list[QuantWeight], device: torch.device, world: World) -> list[list[QuantWeight]]:
    """The layers, in graph order, as groups whose optimization state fits in the memory free now (the least of any
    rank's): one group where all of it fits or free memory is unknown, else consecutive groups of at most
    _GROUP_SHARE of what the copies of every layer (_HELD_PER_WEIGHT) leave (the rest is the steps'). Refuses,
    before any of it is allocated, a layer that alone would not fit (the kernel would kill the process part way)."""
    room = available_bytes(device)
    if not world.solo:  # every rank groups alike
        room = -int(world.max_(torch.tensor([-(room if room is not None else 2**62)]), "the free memory"))
    per_weight = _BYTES_PER_WEIGHT[keeps_freed_memory()]
    sizes = [qw.layer.weight.numel() * per_weight for qw in layers]
    if room is None or sum(sizes) <= room:
        return [list(layers)]
    cap = _GROUP_SHARE * (room - _HELD_PER_WEIGHT * sum(qw.layer.weight.numel() for qw in layers))
    if max(sizes) > cap:
        raise ConfigError(
            f"rounding: a layer of {max(sizes) // per_weight:,} weights needs about {size_text(max(sizes))} to "
            f"optimize, and {size_text(room)} is free on {device}; quantize this model with method RTN "
            f"(--method rtn), or where that much memory is free"
        )
    groups, held = [[]], 0.0
    for qw, need in zip(layers, sizes):
        if groups[-1] and held + need > cap:
            groups.append([])
            held = 0.0
        groups[-1].append(qw)
        held += need
    return groups


def _merged(parts: list[dict]) -> dict:
    """The statistics of groups optimized one after the other, as one run's."""
    steps = sum(p["iterations"] for p in parts)
    seconds = sum(p["seconds"] for p in parts)
    return {
        **parts[-1],
        "iterations": steps,
        "iterations_limit": sum(p["iterations_limit"] for p in parts),
        "weights_changed": sum(p.get("weights_changed", 0) for p in parts),  # none in older checkpoints
        "weights_free": sum(p.get("weights_free", 0) for p in parts),
        "resumed_at": max(p["resumed_at"] for p in parts),
        "seconds": seconds,
        "seconds_per_step": seconds / steps if steps else None,
        "seconds_per_step_after_first": None,  # each group's first step warms up again
        "history": [h for p in parts for h in p["history"]],
    }


def check_resumable(cfg: RoundingConfig) -> None:
    """Before any work: with `resume`, the checkpoint exists, is intact, and its schedule settings equal these.
    (The weights, images and quantizers it also fingerprints are compared when the optimization starts.)"""
    if not cfg.resume:
        return
    saved = read_checkpoint(cfg.checkpoint_dir, CHECKPOINT)["fingerprint"]
    ours = schedule_fields(cfg)
    check_fingerprint(Path(cfg.checkpoint_dir) / CHECKPOINT, {k: saved.get(k) for k in ours}, ours)


def use_act_drop_(gm: nn.Module, drop: tuple[float, torch.Generator] | None) -> None:
    """Every activation quantizer leaves this share of its elements float while it trains (QDrop), or none."""
    for m in gm.modules():
        if isinstance(m, ActQuant):
            m.drop = drop


def use_training_kernels_(gm: nn.Module, on: bool) -> None:
    """Activation quantizers on their training kernels (on: fewer kernels, not traceable) or the traceable formula
    (off, the default)."""
    for m in gm.modules():
        if isinstance(m, ActQuant):
            m.training_kernels = on
