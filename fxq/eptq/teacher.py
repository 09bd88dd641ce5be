"""The float teacher of the rounding optimization: a frozen copy of the float graph, and its interest tensors
per batch, packed (fxq.eptq.distillation), from a cache of every image or recomputed."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx import GraphModule

from fxq.config import RoundingConfig
from fxq.eptq.distillation import Workspace, column_lengths, pack, row_energies
from fxq.errors import ConfigError, GraphCheckFailed
from fxq.ir.graph import float_graph
from fxq.ir.ops import set_eval_

__all__ = ["float_teacher", "bf16_autocast", "TeacherTargets", "flat_outputs", "as_model_wants"]


def float_teacher(gm: GraphModule) -> GraphModule:
    """A frozen copy of the float graph (observers taken out, if gm was calibrated), with its own node state."""
    teacher = float_graph(gm)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return set_eval_(teacher)


def bf16_autocast(device: torch.device, amp: bool | None) -> torch.autocast:
    """RoundingConfig.amp on `device`: None autocasts on CUDA only, True everywhere, False nowhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" if amp is None else amp)


def as_model_wants(x: Tensor, cfg: RoundingConfig) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last and x.dim() == 4 else x


class TeacherTargets:
    """The float graph's interest tensors for a batch, packed (fxq.eptq.distillation.pack): rows of an fp16 cache of
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
        if not names:
            raise GraphCheckFailed(
                "rounding: nothing to distil: the graph has no interest tensors and its output is not one tensor; "
                "return one tensor from the model (or wrap it so it does)"
            )
        probes = {k: flat_outputs(out, self.out_is_tensor) for k, out in outputs.items()}
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
                x = as_model_wants(images[start : start + 32], cfg)
                z = pack(self._forward(x), self.nhwc)
                self.cache[start : start + len(x)].copy_(z)
                self.energy[start : start + len(x)] = row_energies(z, self.lengths)

    @torch.no_grad()
    def _forward(self, x: Tensor) -> list[Tensor]:
        with bf16_autocast(x.device, self.amp):
            return flat_outputs(self.teacher(x), self.out_is_tensor)

    def __call__(self, idx: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Batch `idx` (images `x`): the packed targets and, from the cache, their energies per sample."""
        if self.cache is None:
            return pack(self._forward(x), self.nhwc), None
        idx = idx.to(self.cache.device)
        return self.cache[idx].to(x.device), self.energy[idx].mean(0).to(x.device)


def flat_outputs(out, out_is_tensor: bool) -> list[Tensor]:
    """(output, z_1, ..., z_n) -> the tensors of the loss: the output too when it is one tensor."""
    return list(out) if out_is_tensor else list(out[1:])
