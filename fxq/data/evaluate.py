"""Top-1 / top-5 accuracy on labeled images, with a progress bar."""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fxq.dist.world import World
from fxq.errors import DataError
from fxq.ir.ops import device_of, set_eval_

__all__ = ["evaluate"]


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
) -> dict:
    """{"top1", "top5" (percent), "correct1", "images", "seconds"} of `model` on (x, y); top-1 ties go to the
    lowest class index. In a data-parallel run each rank scores its part of the images and the counts add up."""
    set_eval_(model)
    device = device_of(model)
    c1 = c5 = 0
    checked = False
    t0 = time.perf_counter()
    part = world.part(len(x))
    x, y_all, y = x[part], y, y[part]
    for xb, yb in tqdm(
        list(zip(x.split(batch_size), y.split(batch_size))), desc=desc, unit="batch", disable=not progress
    ):
        out = model(xb.to(device)).float().cpu()
        if not checked:  # every label, not only this rank's part: each rank refuses the same set
            _check_labels(y_all, out.shape[1])
            checked = True
        # quantized logits tie often (8-bit output grid): top-1 is argmax, ties to the lowest class index,
        # a rule every backend can reproduce (topk's order among ties is unspecified)
        top5 = out.topk(min(5, out.shape[1]), dim=1).indices
        c1 += int((out.argmax(1) == yb).sum())
        c5 += int((top5 == yb[:, None]).any(1).sum())
    c1, c5 = (int(c) for c in world.sum_(torch.tensor([c1, c5]), "the evaluation"))
    n = int(y_all.numel())
    return {
        "top1": 100.0 * c1 / n,
        "top5": 100.0 * c5 / n,
        "correct1": c1,
        "images": n,
        "seconds": time.perf_counter() - t0,
    }
