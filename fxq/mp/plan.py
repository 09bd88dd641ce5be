"""Bit allocation plans: the ILP over measured sensitivities under the budgets, solved into a typed plan keyed by
Node, and applied to the graph's specs."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.fx import GraphModule, Node

from fxq.config import MixedPrecisionConfig
from fxq.dist.world import World
from fxq.errors import ConfigError
from fxq.ir.meta import gq, q
from fxq.mp.ilp import Budget, solve_allocation
from fxq.mp.sensitivity import activation_sites, weight_layers

__all__ = ["AllocationPlan", "MixedPrecisionState", "mp_state", "solve_plan", "apply_plan", "agree_"]


@dataclass
class AllocationPlan:
    """One solution of the allocation ILP: a width per weight layer (and per activation site)."""

    measure: str  # the sensitivity measure it was solved under
    weight_bits: dict[Node, int]
    act_bits: dict[Node, int] = field(default_factory=dict)
    options: list[int] = field(default_factory=list)
    act_options: list[int] = field(default_factory=list)
    objective: float = 0.0
    usage: dict[str, float] = field(default_factory=dict)
    limits: dict[str, float] = field(default_factory=dict)
    solve_seconds: float = 0.0
    weight_bytes: float = 0.0
    avg_bits: float = 0.0
    act_avg_bits: float | None = None

    def to_dict(self) -> dict:
        """The report's form: node names for Nodes."""
        out = {
            "measure": self.measure,
            "options": self.options,
            "objective": self.objective,
            "usage": self.usage,
            "limits": self.limits,
            "solve_seconds": self.solve_seconds,
            "weight_bytes": self.weight_bytes,
            "avg_bits": self.avg_bits,
            "bits": {n.name: b for n, b in self.weight_bits.items()},
        }
        if self.act_bits:
            out.update(
                act_options=self.act_options,
                act_avg_bits=self.act_avg_bits,
                act_bits={n.name: b for n, b in self.act_bits.items()},
            )
        return out


@dataclass
class MixedPrecisionState:
    """What mixed precision learned about a graph (gm.meta["fxq"].mixed_precision)."""

    measures: list[str] = field(default_factory=list)  # the sensitivity measures weighed
    sensitivity_images: int = 0
    stacked_layers: int = 0
    plan: AllocationPlan | None = None  # the allocation applied to the graph's specs
    candidates: dict[str, AllocationPlan] = field(default_factory=dict)  # one per measure, when several
    selected: str | None = None  # the measure whose plan SelectAllocation kept
    agreement: dict[str, float] = field(default_factory=dict)  # percent top-1 agreement with float, per measure
    check_images: int = 0

    def to_dict(self) -> dict:
        out = {
            "measures": self.measures,
            "sensitivity_images": self.sensitivity_images,
            "stacked_layers": self.stacked_layers,
            **(self.plan.to_dict() if self.plan else {}),
        }
        if self.candidates:
            out["candidates"] = {m: p.to_dict() for m, p in self.candidates.items()}
        if self.selected is not None:
            out.update(selected=self.selected, agreement=self.agreement, check_images=self.check_images)
        return out


def mp_state(gm: GraphModule) -> MixedPrecisionState:
    """The graph's mixed-precision record, made when first asked for."""
    g = gq(gm)
    if g.mixed_precision is None:
        g.mixed_precision = MixedPrecisionState()
    return g.mixed_precision


def solve_plan(gm: GraphModule, cfg: MixedPrecisionConfig, act_bits: int, measure: str) -> AllocationPlan:
    """The ILP's allocation under one measure's sensitivities (NodeQ.sensitivity[measure])."""
    layers = weight_layers(gm)
    acts = activation_sites(gm) if cfg.act_bit_options else []
    table = [q(n).sensitivity[measure] for n in layers] + [q(n).act_sensitivity[measure] for n in acts]
    w_opts = list(table[0])
    a_opts = list(table[len(layers)]) if acts else []
    options = sorted(set(w_opts) | set(a_opts))  # one column per width; each row allows its own widths
    allowed = np.array([[b in row for b in options] for row in table])
    cost = np.array([[row.get(b, 0.0) for b in options] for row in table])
    bits = np.array(options, dtype=np.float64)[None, :]
    numel = np.array([gm.get_submodule(n.target).weight.numel() for n in layers], dtype=np.float64)[:, None]
    act_numel = np.array([_per_image_numel(n) for n in acts], dtype=np.float64)[:, None]
    budgets = _budgets(cfg, act_bits, layers, numel, act_numel, bits, options, w_opts)
    alloc = solve_allocation(cost, budgets, allowed=allowed)
    chosen = [options[k] for k in alloc.choice]
    w_bits = np.array(chosen[: len(layers)], dtype=np.float64)
    plan = AllocationPlan(
        measure=measure,
        weight_bits=dict(zip(layers, chosen)),
        options=w_opts,
        objective=alloc.objective,
        usage=alloc.usage,
        limits={b.name: b.limit for b in budgets},
        solve_seconds=alloc.seconds,
        weight_bytes=float((numel[:, 0] * w_bits).sum() / 8),
        avg_bits=float((numel[:, 0] * w_bits).sum() / numel.sum()),
    )
    if acts:
        a_bits = np.array(chosen[len(layers) :], dtype=np.float64)
        plan.act_bits = dict(zip(acts, chosen[len(layers) :]))
        plan.act_options = a_opts
        plan.act_avg_bits = float((act_numel[:, 0] * a_bits).sum() / act_numel.sum())
    return plan


def agree_(plan: AllocationPlan, world: World) -> AllocationPlan:
    """The plan with rank 0's widths on every rank (in place; a no-op alone or where they agree already)."""
    if world.solo:
        return plan
    nodes = [*plan.weight_bits, *plan.act_bits]
    mine = torch.tensor([[*plan.weight_bits.values(), *plan.act_bits.values()]], dtype=torch.int64)
    first = world.gather(mine, "the bit allocation")[0][0].tolist()
    plan.weight_bits = dict(zip(nodes[: len(plan.weight_bits)], first[: len(plan.weight_bits)]))
    plan.act_bits = dict(zip(nodes[len(plan.weight_bits) :], first[len(plan.weight_bits) :]))
    return plan


def _budgets(cfg, act_bits, layers, numel, act_numel, bits, options, w_opts) -> list[Budget]:
    """Budget rows over the weight layers followed by the activation sites (zero usage where not theirs)."""
    n_acts = len(act_numel)

    def on_weights(usage: np.ndarray) -> np.ndarray:
        return np.vstack([usage, np.zeros((n_acts, usage.shape[1]))])

    memory = numel * bits / 8
    out = []
    if cfg.weight_memory is not None:
        out.append(Budget("weight memory (bytes)", on_weights(memory), cfg.weight_memory))
    if cfg.avg_bits is not None:
        limit = cfg.avg_bits * numel.sum() / 8
        out.append(Budget(f"weight memory (bytes, {cfg.avg_bits} bits/weight)", on_weights(memory), limit))
    if cfg.bops is not None:
        macs = np.array([q(n).macs for n in layers], dtype=np.float64)[:, None]
        out.append(Budget("BOPs", on_weights(macs * bits * act_bits), cfg.bops))
    if cfg.latency is not None:
        usage = _latency_usage(cfg.latency_table, layers, options, w_opts)
        out.append(Budget("latency (ms)", on_weights(usage), cfg.latency))
    if cfg.act_avg_bits is not None:
        usage = np.vstack([np.zeros((len(layers), len(options))), act_numel * bits / 8])
        limit = cfg.act_avg_bits * act_numel.sum() / 8
        out.append(Budget(f"activation bytes per image ({cfg.act_avg_bits} bits/value)", usage, limit))
    return out


def apply_plan(gm: GraphModule, plan: AllocationPlan) -> None:
    """Set `plan`'s widths on gm's specs (the plan's Nodes are gm's) and record it as the graph's plan."""
    for n, b in plan.weight_bits.items():
        q(n).wspec = q(n).wspec.with_bits(b)
    for n, b in plan.act_bits.items():
        q(n).aspec = q(n).aspec.with_bits(b)
    mp_state(gm).plan = plan


def _per_image_numel(node: Node) -> int:
    """Values per image of a node's output (its recorded shape without the batch dimension)."""
    shape = node.meta["tensor_meta"].shape
    return int(np.prod(shape[1:])) if len(shape) > 1 else 1


def _latency_usage(table: dict, layers: list[Node], options: list[int], w_opts: list[int]) -> np.ndarray:
    try:
        return np.array([[float(table[n.name][b]) if b in w_opts else 0.0 for b in options] for n in layers])
    except KeyError as e:
        raise ConfigError(
            f"latency_table has no entry {e} for a layer or width; it needs {{layer: {{bits: ms}}}} for every "
            f"weight layer ({', '.join(n.name for n in layers[:3])}, ...) and every width in {w_opts}"
        ) from None
