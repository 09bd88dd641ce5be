"""This process's place in a data-parallel run, and the collectives fxq's stages merge their findings with.

A run under torch.distributed (torchrun; NCCL on GPUs, gloo on CPUs) splits the images among its ranks; each stage
then merges what its rank found, so that every rank holds what one process would have computed: exactly where the
merge is exact (minima and maxima, samples gathered in batch order, tables each of whose cells one rank computed),
up to float summation order where it adds (Welford states, gradients). A single process is a World of size 1, in
which every collective returns its input.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from fxq.errors import RankLost, first_line

__all__ = ["World"]


@dataclass(frozen=True)
class World:
    """rank of size; `World()` is one process alone."""

    rank: int = 0
    size: int = 1

    def __post_init__(self):
        if not 0 <= self.rank < self.size:
            raise ValueError(f"need 0 <= rank < size, got rank {self.rank} of {self.size}")

    @classmethod
    def current(cls) -> World:
        """The default process group's world when torch.distributed is initialised, else one process alone."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def solo(self) -> bool:
        return self.size == 1

    @property
    def main(self) -> bool:
        """Rank 0: the one rank that prints, writes reports, models and checkpoints."""
        return self.rank == 0

    # --- who does what: the same answer on every rank, from the run's shapes alone ---

    def owns(self, i: int) -> bool:
        """Item i (a calibration batch, an image of the teacher cache) is this rank's: items go round-robin."""
        return i % self.size == self.rank

    def shard(self, n: int) -> range:
        """This rank's items of 0..n-1, round-robin."""
        return range(self.rank, n, self.size)

    def part(self, n: int, rank: int | None = None) -> slice:
        """A rank's contiguous part of n rows (of one batch), as torch.tensor_split cuts them: the first n % size
        parts one row longer."""
        r = self.rank if rank is None else rank
        base, extra = divmod(n, self.size)
        start = r * base + min(r, extra)
        return slice(start, start + base + (r < extra))

    # --- collectives: no-ops alone; every rank must call them in the same order ---

    def sum_(self, t: Tensor, what: str) -> Tensor:
        """t summed over the ranks, in place (and returned)."""
        return self._all_reduce(t, dist.ReduceOp.SUM, what)

    def min_(self, t: Tensor, what: str) -> Tensor:
        return self._all_reduce(t, dist.ReduceOp.MIN, what)

    def max_(self, t: Tensor, what: str) -> Tensor:
        return self._all_reduce(t, dist.ReduceOp.MAX, what)

    def any(self, flag: bool, what: str) -> bool:
        """Whether any rank's flag is set: a decision every rank takes alike (stop now, the budget is spent)."""
        if self.solo:
            return flag
        return bool(self.max_(torch.tensor([float(flag)], device=_device()), what).item())

    def gather(self, t: Tensor, what: str) -> list[Tensor]:
        """Every rank's t, in rank order; the first dimension may differ between ranks, the others may not."""
        if self.solo:
            return [t]
        with self._guard(what):
            dev = _device()
            sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(self.size)]
            dist.all_gather(sizes, torch.tensor([t.shape[0]], dtype=torch.int64, device=dev))
            sizes = [int(s) for s in sizes]
            if max(sizes) == 0:
                return [t] * self.size
            padded = t.new_zeros((max(sizes), *t.shape[1:]), device=dev)
            padded[: t.shape[0]] = t
            out = [torch.empty_like(padded) for _ in range(self.size)]
            dist.all_gather(out, padded)
        return [o[:n].to(t.device) for o, n in zip(out, sizes)]

    def exchange(self, send: Tensor, send_counts: list[int], recv_counts: list[int], what: str) -> Tensor:
        """All-to-all: rows send[sum(send_counts[:r]) : ...] go to rank r; the rows from each rank come back
        concatenated in rank order (recv_counts[r] from rank r)."""
        if self.solo:
            return send
        dev = _device()
        out = send.new_empty((sum(recv_counts), *send.shape[1:]), device=dev)
        with self._guard(what):
            dist.all_to_all_single(out, send.to(dev), recv_counts, send_counts)
        return out.to(send.device)

    def broadcast_bytes(self, data: bytes | None, what: str) -> bytes:
        """Rank 0's bytes on every rank (a checkpoint only rank 0's file system holds)."""
        if self.solo:
            return data
        dev = _device()
        with self._guard(what):
            n = torch.tensor([len(data) if self.main else 0], dtype=torch.int64, device=dev)
            dist.broadcast(n, 0)
            buf = torch.empty(int(n), dtype=torch.uint8, device=dev)
            if self.main:
                buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            dist.broadcast(buf, 0)
        return bytes(buf.cpu().numpy())

    def barrier(self, what: str) -> None:
        if not self.solo:
            with self._guard(what):
                dist.barrier()

    def _all_reduce(self, t: Tensor, op, what: str) -> Tensor:
        if self.solo:
            return t
        dev = _device()
        with self._guard(what):
            if t.device == dev:
                dist.all_reduce(t, op)
            else:
                moved = t.to(dev)
                dist.all_reduce(moved, op)
                t.copy_(moved)
        return t

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """A collective that fails because a peer is gone (crashed, killed, unreachable, timed out) ends the run
        with one line that says where, instead of a backend's stack trace."""
        try:
            yield
        except RuntimeError as e:
            raise RankLost(
                f"rank {self.rank} of {self.size}: another rank stopped answering during {what} ({first_line(e)}); "
                f"its own output (or torchrun's summary) names it. A checkpoint written so far is intact: run "
                f"again with --resume, with any number of ranks"
            ) from None


def _device() -> torch.device:
    """Where the collectives' tensors live: the current GPU for NCCL, the CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
