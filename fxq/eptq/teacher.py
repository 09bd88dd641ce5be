"""The float teacher of the rounding optimization: a frozen copy of the float graph, and its interest tensors
per batch, packed (fxq.eptq.distillation), from a cache of every image or recomputed."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx import GraphModule

from fxq.config import RoundingConfig
from fxq.dist.world import World
from fxq.eptq.distillation import Workspace, column_lengths, pack, row_energies
from fxq.errors import ConfigError, GraphCheckFailed
from fxq.ir.graph import float_graph
from fxq.ir.ops import set_eval_
from fxq.memory import available_bytes, size_text

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

    In a data-parallel run the cache is sharded: each rank computes and holds the rows of the images it owns
    (round-robin), and each step the owners send every rank the rows of its part of the batch (one all-to-all);
    the per-image energies, a few numbers per image, are on every rank.
    """

    def __init__(
        self, teacher: GraphModule, images: Tensor, cfg: RoundingConfig, interest_names: list[str], world=World()
    ):
        self.teacher, self.amp, self.world = teacher, cfg.amp, world
        self.nhwc = cfg.channels_last and images.dim() == 4
        self.cache: Tensor | None = None  # row k: the k-th image this rank owns
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
        bad = [n for i, n in enumerate(names) if not _image_major([ts[i] for ts in probes.values()])]
        if bad:
            raise GraphCheckFailed(
                f"rounding: tensors {bad[:3]} do not have the batch as their first dimension (or folded into it "
                f"with each image's rows together), and the loss compares them image by image; make the model "
                f"batch-first (e.g. nn.MultiheadAttention(batch_first=True))"
            )
        self.lengths = column_lengths(probes[max(probes)], max(probes)).to(images.device)
        if cfg.teacher_cache == "off":
            return
        owned = torch.tensor(list(world.shard(len(images))), dtype=torch.int64)
        need = int(self.lengths.sum()) * 2 * len(owned)
        on_gpu = images.device.type == "cuda"
        room = 0.3 * available_bytes(images.device) if on_gpu else 8 * 2**30
        if cfg.teacher_cache == "on" and need > room:
            raise ConfigError(
                f"rounding: the teacher cache needs {size_text(need)}, more than the {size_text(room)} "
                f"allowed; use teacher_cache='off' (recompute) or fewer images"
            )
        # every rank takes the same decision: on the largest shard's size
        fits = not world.any(need > room, "the teacher cache's size")
        if fits and (cfg.teacher_cache == "on" or cfg.iterations * cfg.batch_size >= len(images)):
            self._fill(images, owned, cfg)

    @torch.no_grad()
    def _fill(self, images: Tensor, owned: Tensor, cfg: RoundingConfig) -> None:
        """The cache rows of this rank's images; every image's energies."""
        self.cache = torch.empty(len(owned), int(self.lengths.sum()), dtype=torch.float16, device=images.device)
        energy = torch.empty(len(owned), len(self.lengths), device=images.device)
        for start in range(0, len(owned), 32):
            x = as_model_wants(images[owned[start : start + 32].to(images.device)], cfg)
            z = pack(self._forward(x), self.nhwc, len(x))
            self.cache[start : start + len(x)].copy_(z)
            energy[start : start + len(x)] = row_energies(z, self.lengths)
        if self.world.solo:
            self.energy = energy
            return
        self.energy = torch.empty(len(images), len(self.lengths), device=images.device)
        for rank, rows in enumerate(self.world.gather(energy, "the teacher cache's energies")):
            self.energy[rank :: self.world.size] = rows.to(self.energy.device)

    @torch.no_grad()
    def _forward(self, x: Tensor) -> list[Tensor]:
        with bf16_autocast(x.device, self.amp):
            return flat_outputs(self.teacher(x), self.out_is_tensor)

    def __call__(self, batch: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """For the images `batch` (indices), of which `x` holds this rank's part: the packed targets of that
        part and the teacher's energies per tensor, averaged over the whole batch (None alone without a cache:
        the loss takes them from the targets)."""
        w = self.world
        if self.cache is None:
            zf = pack(self._forward(x), self.nhwc, len(x)) if len(x) else x.new_empty(0, int(self.lengths.sum()))
            if w.solo:
                return zf, None
            energy = row_energies(zf, self.lengths).sum(0) if len(x) else zf.new_zeros(len(self.lengths))
            return zf, w.sum_(energy, "the teacher's energies") / len(batch)
        energy = self.energy[batch.to(self.energy.device)].mean(0).to(x.device)
        if w.solo:
            return self.cache[batch.to(self.cache.device)].to(x.device), energy
        return self._exchange(batch).to(x.device), energy

    def _exchange(self, batch: Tensor) -> Tensor:
        """The cache rows of this rank's part of `batch`, from the ranks that own them (one all-to-all)."""
        w, n = self.world, len(batch)
        parts = [range(n)[w.part(n, r)] for r in range(w.size)]
        owner = (batch % w.size).tolist()
        rows = batch.div(w.size, rounding_mode="floor")  # image j is row j // size of its owner's cache
        send = [[p for p in part if owner[p] == w.rank] for part in parts]  # to each rank, in batch order
        mine = parts[w.rank]
        from_each = [[p for p in mine if owner[p] == r] for r in range(w.size)]
        picked = torch.tensor([p for to in send for p in to], dtype=torch.int64)
        got = w.exchange(
            self.cache[rows[picked].to(self.cache.device)],
            [len(to) for to in send],
            [len(f) for f in from_each],
            "the teacher cache's exchange",
        )
        order = torch.tensor([p - mine.start for f in from_each for p in f], dtype=torch.int64)
        out = torch.empty_like(got)
        out[order.to(out.device)] = got
        return out


def flat_outputs(out, out_is_tensor: bool) -> list[Tensor]:
    """(output, z_1, ..., z_n) -> the tensors of the loss: the output too when it is one tensor."""
    return list(out) if out_is_tensor else list(out[1:])


def _image_major(probes: list[Tensor]) -> bool:
    """Whether an interest tensor, seen at batch 1 (and 2), has the batch first or folded into its first dimension
    with each image's rows together: then row b of its (batch, -1) view is image b's. With two images the first
    image's rows must come first, as they do alone."""
    if any(t.dim() == 0 or len(t) % k for k, t in enumerate(probes, 1)):
        return False
    rows = {len(t) // k for k, t in enumerate(probes, 1)}
    if len(rows) != 1:
        return False
    m = rows.pop()
    if m == 1 or len(probes) == 1:
        return True
    alone, first = probes[0].float(), probes[1][:m].float()
    return bool((first - alone).norm() <= 0.05 * alone.norm() + 1e-6)
