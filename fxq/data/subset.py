"""Subsets that represent their set: N images drawn with a seed, spread over the classes where labels exist.

Image sets are often sorted (the shared CIFAR-10 files are sorted by class), so the first N images of one can
be a single class. `choose` draws a seeded shuffle instead, stratified by label when labels are known: each
class gets its share of N, and the rest goes to the classes with the largest remainders. `first=True` keeps the
first N, for the runs that want exactly that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fxq.errors import ConfigError

__all__ = ["Subset", "choose"]


@dataclass(frozen=True)
class Subset:
    """Which images of a set to use: `count` of them (None: all), drawn with `seed`, or the first `count`."""

    count: int | None = None
    first: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.count is not None and (isinstance(self.count, bool) or self.count < 1):
            raise ConfigError(f"a subset needs a count >= 1 (or None for all), got {self.count}")


def choose(n: int, subset: Subset, labels: Sequence[int] | Tensor | None = None) -> tuple[Tensor, str]:
    """Indices into a set of `n` images (in ascending order, so decoding stays sequential) and a sentence
    saying how they were chosen, for the report."""
    if subset.count is None or subset.count >= n:
        return torch.arange(n), f"all {n} images"
    k = subset.count
    if subset.first:
        return torch.arange(k), f"the first {k} of {n} images"
    g = torch.Generator().manual_seed(subset.seed)
    if labels is None:
        idx = torch.randperm(n, generator=g)[:k]
        return idx.sort().values, f"{k} of {n} images drawn at random (seed {subset.seed})"
    y = torch.as_tensor(labels).reshape(-1)
    classes, counts = torch.unique(y, return_counts=True)
    share = counts.double() * k / n
    take = share.floor().long()
    rest = k - int(take.sum())
    if rest:  # largest remainders first, ties broken by the seeded draw
        order = torch.argsort(
            share - take + 1e-9 * torch.rand(len(share), generator=g, dtype=torch.float64), descending=True
        )
        take[order[:rest]] += 1
    picked = []
    for c, m in zip(classes.tolist(), take.tolist()):
        members = (y == c).nonzero().reshape(-1)
        picked.append(members[torch.randperm(len(members), generator=g)[:m]])
    idx = torch.cat(picked).sort().values
    shown = int((take > 0).sum())
    return (
        idx,
        f"{k} of {n} images drawn at random (seed {subset.seed}), stratified over {shown} of {len(classes)} classes",
    )
