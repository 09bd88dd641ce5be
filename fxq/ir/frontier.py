"""A graph run in stages over many batches at once: every batch goes up to a node, then all of them go on to
the next. A pass that decides something at a node from every image's value there (and changes what the rest
of the graph computes) runs this way; between two stops each batch keeps only the values that later nodes
read, in half precision where that holds them."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx import GraphModule, Interpreter, Node

from fxq.errors import ConfigError, GraphCheckFailed
from fxq.memory import available_bytes, size_text

__all__ = ["Frontier"]

_HALF_MAX = 65504.0  # the largest finite float16: a value beyond it is kept in float32


class Frontier(Interpreter):
    """Runs `gm` on each of `batches` (its first input; any other input takes its default) up to a stop node,
    then on from there. `values_of` reads the values held at the current stop."""

    def __init__(self, gm: GraphModule, batches: list[Tensor], remedy: str):
        super().__init__(gm, garbage_collect_values=False)
        self.remedy = remedy  # what the caller can do when the values held at a stop would not fit in memory
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        # the position of each node's last reader: past it the node's value is dropped
        self.last_read = {n: max((self.index[u] for u in n.users), default=-1) for n in self.nodes}
        inputs = [n for n in self.nodes if n.op == "placeholder"]
        if not inputs:
            raise GraphCheckFailed("frontier: the graph has no input")
        self.held: list[dict[Node, object]] = [{inputs[0]: x} for x in batches]  # per batch, between stops
        self.halved: list[set[Node]] = [set() for _ in batches]  # which of them are stored as float16
        self.at = self.index[inputs[0]] + 1  # the next node to run

    @torch.no_grad()
    def advance_to(self, stop: Node) -> None:
        """Every batch up to `stop` (not run): the values `stop` and the nodes after it read are held."""
        end = self.index[stop]
        if end < self.at:
            raise GraphCheckFailed(f"frontier: {stop.name} is behind the current stop")
        for k in range(len(self.held)):
            self.env = dict(zip(self.held[k], self.values_of(k, list(self.held[k]))))
            for node in self.nodes[self.at : end]:
                if node.op != "output":
                    self.env[node] = self.run_node(node)
            self.held[k] = {n: _stored(v) for n, v in self.env.items() if self.last_read[n] >= end}
            self.halved[k] = {n for n, v in self.held[k].items() if _halved(self.env[n], v)}
            if k == 0:
                self._check_room(stop)
        self.env = {}
        self.at = end

    def values_of(self, k: int, nodes: list[Node]) -> list:
        """The values of `nodes` (held at this stop) in batch k, in float32 where they were stored halved (one
        batch at a time: all of them in float32 at once could be more than the memory holds)."""
        return [self.held[k][n].float() if n in self.halved[k] else self.held[k][n] for n in nodes]

    def held_bytes(self) -> int:
        """The bytes of tensors held between stops, over all batches."""
        return sum(_bytes(held.values()) for held in self.held)

    def _check_room(self, stop: Node) -> None:
        """After the first batch reached `stop`: refuse to go on when the others' values there would not fit."""
        first = _bytes(self.held[0].values())
        more = first * len(self.held) - self.held_bytes()
        device = next((v.device for v in self.held[0].values() if isinstance(v, Tensor)), torch.device("cpu"))
        room = available_bytes(device)
        if room is not None and more > room:
            raise ConfigError(
                f"the values held at {stop.name} for {len(self.held)} batches take about {size_text(more)} more, "
                f"and {size_text(room)} is free; {self.remedy}"
            )

    def placeholder(self, target, args, kwargs):
        """An input other than the first: its default."""
        node = next(n for n in self.nodes if n.op == "placeholder" and n.target == target)
        if not node.args:
            raise GraphCheckFailed(f"frontier: the graph's input {target!r} has no default; it takes one input")
        return node.args[0]


def _stored(v):
    """A float32 tensor held as float16 when its values fit (activations do; the halving costs 3 decimal
    digits, which the statistics taken from them do not miss)."""
    if isinstance(v, Tensor) and v.dtype == torch.float32 and v.numel() > 1:
        low, high = torch.aminmax(v)  # one pass, no copy
        if max(-float(low), float(high)) <= _HALF_MAX:
            return v.half()
    return v


def _halved(value, stored) -> bool:
    return isinstance(value, Tensor) and value.dtype != stored.dtype


def _bytes(values) -> int:
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, Tensor))
