"""Partial re-execution: every node's float value for one batch, then re-runs of only the part of the graph
below a node whose output was replaced (mixed precision measures each layer and width this way)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx import GraphModule, Interpreter, Node
from torch.fx.node import map_arg

from fxq.ir.graph import dataflow, downstream

__all__ = ["Downstream"]


class Downstream(Interpreter):
    """The float values of every node for one batch, and re-runs of the part of the graph below one node."""

    def __init__(self, gm: GraphModule, x: Tensor):
        super().__init__(gm, garbage_collect_values=False)
        with torch.no_grad():
            self.out = self.run(x)
        self.float_env = dict(self.env)
        self.batch = x.shape[0]
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.flow = dataflow(gm)
        inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.batched = downstream(self.flow, inputs) | set(inputs)  # hold a batch dim, or a size derived from one

    def below(self, node: Node) -> list[Node]:
        """The nodes whose values depend on `node`'s, in graph order."""
        return sorted(downstream(self.flow, [node]), key=self.order.__getitem__)

    @torch.no_grad()
    def rerun(self, node: Node, value: Tensor, below: list[Node], copies: int, keep: set[Node]) -> dict[Node, Tensor]:
        """Values of the `keep` nodes among `below` when `node` outputs `value` (`copies` candidates stacked along
        the batch). Every other value is dropped after its last use: holding all of them would hold every activation of every
        candidate at once."""
        changed = {node: value}
        widened: dict[Node, object] = {}
        last_use = {a: n for n in below for a in n.all_input_nodes}

        def fetch(a: Node):
            if a in changed:
                return changed[a]
            if a not in widened:
                v = self.float_env[a]
                stacked = copies > 1 and a in self.batched
                if stacked and isinstance(v, Tensor) and v.dim() > 0:
                    v = v.repeat(copies, *([1] * (v.dim() - 1)))
                elif stacked and not isinstance(v, Tensor):  # a size read off the batch (x.size(0)): read it again
                    v = getattr(self, a.op)(a.target, map_arg(a.args, fetch), map_arg(a.kwargs, fetch))
                widened[a] = v
            return widened[a]

        for n in below:
            args, kwargs = map_arg(n.args, fetch), map_arg(n.kwargs, fetch)
            changed[n] = getattr(self, n.op)(n.target, args, kwargs)
            for a in n.all_input_nodes:
                if last_use[a] is n and a not in keep:
                    changed.pop(a, None)
                    widened.pop(a, None)
        return changed
