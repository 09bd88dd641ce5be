"""The check every export runs: the lowered model next to the fake-quant reference on real inputs.

Integer kernels and the reference agree exactly but for rounding ties in requantization, whose effect is a step
here and there that the next layers may carry along. A kernel that computes another function (u8 x s8 pairs
saturating in int16 on x86 without VNNI, an op lowered wrongly) moves outputs by many steps and flips top-1
classes; the limits tell the two apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from fxq.backends.lowering import max_dense_grid_bits
from fxq.errors import ConfigError, DataError, ExportMismatch
from fxq.ir.ops import grid_source
from fxq.quant.modules import ActQuant
from fxq.targets import host_isa

__all__ = ["CheckLimits", "ExportCheck", "check_lowered", "compare_outputs", "enforce", "output_step"]


@dataclass(frozen=True)
class CheckLimits:
    """How far an exported model may stray from the reference before the export is refused."""

    max_output_steps: float = 8.0  # the largest difference of any output, in steps of the output quantizer
    # share of inputs (class-score outputs) whose top-1 class the reference scores within `tie_steps` of its best:
    # where the reference's own top two lie a step apart, a requantization tie upstream may swap them
    min_top1_agreement: float = 0.99
    tie_steps: float = 1.0
    images: int = 64  # check inputs used (the first ones given)
    batch_size: int = 32

    def __post_init__(self):
        if not self.max_output_steps >= 0 or not 0 <= self.min_top1_agreement <= 1:
            raise ConfigError(
                f"check limits: need max_output_steps >= 0 and min_top1_agreement in [0, 1], got "
                f"{self.max_output_steps}, {self.min_top1_agreement}"
            )
        if self.images < 1 or self.batch_size < 1:
            raise ConfigError(f"check limits: images and batch_size must be >= 1, got {self.images}, {self.batch_size}")


@dataclass
class ExportCheck:
    """What the check measured, and whether it holds the export to its limits on this machine."""

    backend: str
    host_isa: str
    images: int
    output_step: float | None
    max_abs_steps: float
    mean_abs_steps: float
    top1_agreement: float | None  # same top-1 class as the reference
    top1_within_ties: float | None  # a top-1 class the reference scores within tie_steps of its best
    enforced: bool  # False where this machine cannot compute the model's integer form exactly
    passed: bool
    note: str = ""

    def summary(self) -> str:
        agree = (
            ""
            if self.top1_agreement is None
            else f", top-1 agreement {100 * self.top1_agreement:.1f} % ({100 * self.top1_within_ties:.1f} % within ties)"
        )
        verdict = "ok" if self.passed else "FAILED" if self.enforced else "not enforced"
        return (
            f"{self.backend} vs reference on {self.images} inputs: max {self.max_abs_steps:.1f} output steps, mean "
            f"{self.mean_abs_steps:.3f}{agree} [{verdict}]" + (f" ({self.note})" if self.note else "")
        )

    def to_dict(self) -> dict:
        return asdict(self)


def output_step(qgm: GraphModule) -> float | None:
    """The step of the quantizer the model's (first) output is on; None when it is on no grid."""
    out = next(n for n in qgm.graph.nodes if n.op == "output").args[0]
    first = out if isinstance(out, Node) else next((a for a in torch.utils._pytree.tree_leaves(out)), None)
    src = grid_source(qgm, first, ActQuant) if isinstance(first, Node) else None
    return float(qgm.get_submodule(src.target).scale) if src is not None else None


def _first(out) -> Tensor:
    return out if isinstance(out, Tensor) else torch.as_tensor(torch.utils._pytree.tree_leaves(out)[0])


@dataclass(frozen=True)
class _Steps:
    max: float
    mean: float


def compare_outputs(
    ref: Tensor, got: Tensor, step: float, tie_steps: float
) -> tuple[_Steps, float | None, float | None]:
    """(max and mean |got - ref| in steps, share with the same top-1, share whose top-1 the reference scores within
    `tie_steps` of its best); the shares are None unless the outputs are class scores (N, C >= 2)."""
    d = (got - ref).abs().flatten() / step
    steps = _Steps(float(d.max()), float(d.mean()))
    if ref.dim() != 2 or ref.shape[1] < 2:
        return steps, None, None
    picked = got.argmax(1, keepdim=True)
    deficit = (ref.max(1).values - ref.gather(1, picked)[:, 0]) / step
    same = float((picked[:, 0] == ref.argmax(1)).float().mean())
    return steps, same, float((deficit <= tie_steps * (1 + 1e-4)).float().mean())


@torch.no_grad()
def check_lowered(
    qgm: GraphModule, run: Callable[[Tensor], object], inputs: Tensor, backend: str, limits: CheckLimits = CheckLimits()
) -> ExportCheck:
    """Run `run` (the lowered model) and `qgm` on the first `limits.images` of `inputs`; compare their outputs."""
    x_all = inputs[: limits.images]
    if len(x_all) == 0:
        raise DataError(f"{backend} check: no inputs given; pass calibration images to check the export on")
    step = output_step(qgm)
    pairs = [(_first(qgm(x)).float().cpu(), _first(run(x)).float().cpu()) for x in x_all.split(limits.batch_size)]
    ref = torch.cat([r for r, _ in pairs])
    got = torch.cat([g.reshape(r.shape) for r, g in pairs])
    d, top1, within = compare_outputs(ref, got, step or 1.0, limits.tie_steps)
    host = host_isa()
    needs = max_dense_grid_bits(qgm)
    enforced = needs <= host.dense_weight_bits
    ok = d.max <= limits.max_output_steps and (within is None or within >= limits.min_top1_agreement)
    note = ""
    if not enforced:
        note = (
            f"this machine ({host.value}) computes {needs}-bit weight grids inexactly; the figures say nothing "
            f"about the target device: check the model there"
        )
    elif step is None:
        note = "the output is on no quantizer grid: differences in its own units"
    return ExportCheck(
        backend=backend,
        host_isa=host.value,
        images=len(x_all),
        output_step=step,
        max_abs_steps=d.max,
        mean_abs_steps=d.mean,
        top1_agreement=top1,
        top1_within_ties=within,
        enforced=enforced,
        passed=ok,
        note=note,
    )


def enforce(check: ExportCheck, limits: CheckLimits, what: str) -> None:
    """Raise ExportMismatch when an enforced check failed."""
    if check.passed or not check.enforced:
        return
    raise ExportMismatch(
        f"{what}: the exported model strays from the reference: {check.summary()}; limits "
        f"{limits.max_output_steps} steps and {100 * limits.min_top1_agreement:.0f} % top-1 agreement within ties. "
        f"The model's grids fit this machine's integer kernels ({check.host_isa}), so the {check.backend} lowering computes "
        f"some op differently from the reference: please report it with the model. Nothing was written; pass "
        f"--force (force=True) to write it anyway"
    )
