"""Top-1 / top-5 accuracy on labeled images, with a progress bar."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from fxq.dist.world import World
from fxq.errors import DataError
from fxq.ir.ops import device_of, set_eval_

__all__ = ["evaluate", "kl_per_image", "log_probs"]


def _check_labels(y: Tensor, classes: int) -> None:
    """Labels the model cannot output mean the wrong image set (ImageNet's for a CIFAR-10 model, say): say so
    instead of scoring near 0."""
    top = int(y.max()) if y.numel() else -1
    if top >= classes or (y.numel() and int(y.min()) < 0):
        raise DataError(
            f"the labels run from {int(y.min())} to {top} but the model has {classes} outputs: the labeled set "
            f"does not belong to this model; give its own set (--val)"
        )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int = 50,
    progress: bool = True,
    desc: str = "eval",
    world: World = World(),
    reference: Tensor | None = None,
    per_image: bool = False,
) -> dict:
    """{"top1", "top5" (percent), "correct1", "images", "seconds"} of `model` on (x, y); top-1 ties go to the
    lowest class index. In a data-parallel run each rank scores its part of the images and the counts add up.

    With `reference`, another model's log-probabilities on x (the float model's, from `log_probs`), also
    "agreement", the share of the images whose top-1 is the reference's, and "kl", the mean over the images of
    KL(reference || model): label-free distances, steadier than top-1 where a few images near a class boundary
    decide it.

    With `per_image`, also "top1_images", each image's top-1 class, and with `reference` "kl_images", each image's
    KL: for comparing two models image by image (bench/paired.py) without running either over the images again."""
    set_eval_(model)
    device = device_of(model)
    c1 = c5 = agree = 0
    kl = 0.0
    checked = False
    t0 = time.perf_counter()
    part = world.part(len(x))
    x, y_all, y = x[part], y, y[part]
    refs = reference[part].split(batch_size) if reference is not None else [None] * len(y.split(batch_size))
    classes, kls = [], []  # this rank's per-image values, batch by batch
    for xb, yb, rb in tqdm(
        list(zip(x.split(batch_size), y.split(batch_size), refs)), desc=desc, unit="batch", disable=not progress
    ):
        out = model(xb.to(device)).float().cpu()
        if rb is not None:
            each = kl_per_image(out.log_softmax(1), rb)
            kl += float(each.sum())
            agree += int((out.argmax(1) == rb.argmax(1)).sum())
            kls.append(each)
        classes.append(out.argmax(1))
        if not checked:  # every label, not only this rank's part: each rank refuses the same set
            _check_labels(y_all, out.shape[1])
            checked = True
        # quantized logits tie often (8-bit output grid): top-1 is argmax, ties to the lowest class index,
        # a rule every backend can reproduce (topk's order among ties is unspecified)
        top5 = out.topk(min(5, out.shape[1]), dim=1).indices
        c1 += int((out.argmax(1) == yb).sum())
        c5 += int((top5 == yb[:, None]).any(1).sum())
    counts = torch.tensor([c1, c5, agree, kl], dtype=torch.float64)
    c1, c5, agree, kl = world.sum_(counts, "the evaluation").tolist()
    n = int(y_all.numel())
    out = {
        "top1": 100.0 * c1 / n,
        "top5": 100.0 * c5 / n,
        "correct1": int(c1),
        "images": n,
        "seconds": time.perf_counter() - t0,
    }
    if reference is not None:
        out.update(agreement=agree / n, kl=kl / n)
    if per_image:
        out["top1_images"] = [int(c) for c in _whole(classes, world).tolist()]
        if reference is not None:
            out["kl_images"] = _whole(kls, world).tolist()
    return out


def _whole(pieces: list[Tensor], world: World) -> Tensor:
    """Every image's value from each rank's part of them (the parts are contiguous, in rank order)."""
    mine = torch.cat(pieces).double() if pieces else torch.zeros(0, dtype=torch.float64)
    return torch.cat(world.gather(mine, "the per-image values"))


@torch.no_grad()
def log_probs(model: nn.Module, x: Tensor, batch_size: int = 50) -> Tensor:
    """`model`'s log-softmax over its outputs for each image of x, on the CPU: the reference `evaluate` takes."""
    set_eval_(model)
    device = device_of(model)
    return torch.cat([model(b.to(device)).float().log_softmax(1).cpu() for b in x.split(batch_size)])


def kl_per_image(log_probs: Tensor, reference: Tensor) -> Tensor:
    """KL(reference || model) of each image, from both models' log-probabilities ([N, classes] each)."""
    return F.kl_div(log_probs, reference, log_target=True, reduction="none").sum(1)
