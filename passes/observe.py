"""Observe: an observer after every quantized activation; Calibrate: run the graph on calibration data."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.fx import GraphModule, Node
from torch.utils._pytree import tree_leaves, tree_map
from tqdm.auto import tqdm

from fxq.data.images import call_args
from fxq.dist.world import World
from fxq.errors import DataError, GraphCheckFailed
from fxq.ir.meta import OpKind, gq, q
from fxq.ir.ops import act_module_name, device_of, set_eval_
from fxq.ir.passbase import FxqPass, PassResult
from fxq.quant.modules import ActObserver, ChannelStatsObserver

__all__ = ["Observe", "Calibrate"]


def _insert_after(gm: GraphModule, node: Node, name: str) -> Node:
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, (node,))
    node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
    return new


def _observe_input_stats(gm: GraphModule, node: Node) -> None:
    """Put a ChannelStatsObserver on the edge into a weighted layer (only that layer sees it)."""
    channel_dim = -1 if q(node).kind is OpKind.LINEAR else 1
    name = f"fxq_inmean_{node.name}"
    gm.add_submodule(name, ChannelStatsObserver(channel_dim))
    src = node.args[0]
    with gm.graph.inserting_before(node):
        obs = gm.graph.call_module(name, (src,))
    node.replace_input_with(src, obs)
    q(obs).kind, q(obs).observes = OpKind.OBSERVER, node


class Observe(FxqPass):
    """Insert an ActObserver after every node with an output quantizer spec (NodeQ.aspec), and, for bias
    correction and the output-error weight threshold, a ChannelStatsObserver in front of every weighted layer."""

    def __init__(self, samples_per_batch: int = 4096, input_stats: bool = True):
        self.samples_per_batch = samples_per_batch
        self.input_stats = input_stats

    def call(self, gm: GraphModule) -> PassResult:
        nodes = [n for n in gm.graph.nodes if q(n).kind is not OpKind.OBSERVER]
        todo = [n for n in nodes if q(n).aspec is not None]
        for i, node in enumerate(todo):
            name = act_module_name(node)
            gm.add_submodule(name, ActObserver(self.samples_per_batch, seed=i))
            obs = _insert_after(gm, node, name)
            q(obs).kind, q(obs).observes = OpKind.OBSERVER, node
        weighted = [n for n in nodes if q(n).wspec is not None] if self.input_stats else []
        for node in weighted:
            _observe_input_stats(gm, node)
        gm.recompile()
        return PassResult(gm, modified=bool(todo or weighted))


class Calibrate(FxqPass):
    """Run the observed graph over the calibration batches (no grad, eval mode), with a progress bar.

    In a data-parallel run each rank runs its share of the batches (round-robin) and the observers merge what
    every rank saw: the thresholds then equal one process's on the same batches."""

    def __init__(self, batches: Iterable, progress: bool = True, world: World = World()):
        self.batches = batches
        self.progress = progress
        self.world = world

    def requires(self, gm: GraphModule) -> None:
        if not any(q(n).kind is OpKind.OBSERVER for n in gm.graph.nodes):
            raise GraphCheckFailed("calibrate: no observers in the graph; run Observe first")

    @torch.no_grad()
    def call(self, gm: GraphModule) -> PassResult:
        set_eval_(gm)
        device = device_of(gm)
        observers = [m for m in gm.modules() if isinstance(m, (ActObserver, ChannelStatsObserver))]
        samplers = [m for m in observers if isinstance(m, ActObserver)]
        first = max((m.next_index for m in samplers), default=0)  # batches an earlier calibration already numbered
        batches = list(self.batches) if self.world.size > 1 else self.batches
        total = len(batches) if hasattr(batches, "__len__") else None
        progress = self.progress and self.world.main
        images = 0
        for i, batch in enumerate(tqdm(batches, total=total, desc="calibrate", unit="batch", disable=not progress)):
            if not self.world.owns(i):
                continue
            args = tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, call_args(batch))
            for m in samplers:
                m.next_index = first + i  # which values it samples depends on the batch, not on the rank
            gm(*args)
            images += next(t for t in tree_leaves(args) if isinstance(t, torch.Tensor)).shape[0]
        for m in observers:
            m.merge_(self.world)
        images = int(self.world.sum_(torch.tensor([images]), "calibration"))
        if images == 0:
            raise DataError("calibrate: the calibration data yielded no batches; give at least one image")
        gq(gm).calib_images += images
        return PassResult(gm, modified=False)
