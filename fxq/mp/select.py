"""Label-free agreement: how often a quantized model's top-1 class is the float model's, on held-out calibration
images (the check that chooses among allocations solved under different measures)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from fxq.data.images import batch_inputs
from fxq.errors import DataError
from fxq.ir.ops import device_of, set_eval_

__all__ = ["last_images", "top1", "top1_matches"]


def last_images(batches: Iterable, n: int) -> Tensor:
    """The last n inputs of `batches`, holding only the batches that can still reach into them."""
    tail: deque[Tensor] = deque()
    have = 0
    for b in batches:
        tail.append(batch_inputs(b))
        have += len(tail[-1])
        while have - len(tail[0]) >= n:
            have -= len(tail.popleft())
    if not tail:
        raise DataError("last_images: no batches given; pass the calibration batches")
    return torch.cat(list(tail))[-n:]


@torch.no_grad()
def top1(model: nn.Module, x: Tensor, batch_size: int = 50) -> Tensor:
    """Class indices of `model`'s largest output on x, in eval mode."""
    set_eval_(model)
    dev = device_of(model)
    return torch.cat(
        [model(b.to(dev)).float().argmax(1).cpu() for b in x.split(batch_size)] or [torch.empty(0, dtype=torch.int64)]
    )


def top1_matches(model: nn.Module, x: Tensor, reference: Tensor) -> int:
    """How many inputs `model`'s top-1 equals `reference` (class indices) on."""
    return int((top1(model, x) == reference).sum()) if len(x) else 0
