"""The Label-Free Hessian trace of interest tensors (EPTQ, arXiv 2309.11531, Thm 3.1).

Tr(H_z) ∝ E_x ||J_z f(x)||_F^2, estimated with Hutchinson probes on the model output: for v ~ N(0, I) (or
Rademacher), E_v ||J_z^T v||^2 = ||J_z||_F^2, and one backward of (f(x)·v).sum() yields J_z^T v for every
interest tensor and every sample at once (samples do not interact in eval mode). Only activation gradients
are needed: parameters are frozen during the backward. Each gradient goes from its backward hook to an
LFHReducer (kernels/lfh.py): per-sample squared norms folded into running statistics, on CUDA by one
fused kernel launch per batch of gradients, so memory grows with the number of interest tensors (plus a
capped flush buffer, LFHConfig.flush_mib), not with their size.
Weights: lambda = log10(t) - min(log10(t)) as in the paper (MCT v1 normalises differently).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.fx import GraphModule, Interpreter, Node
from torch.utils._pytree import tree_leaves
from tqdm.auto import tqdm

from fxq.config import LFHConfig, Probe
from fxq.dist.world import World
from fxq.eptq.budget import LFH_SHARE
from fxq.errors import ConfigError, GraphCheckFailed, UnsupportedOp
from fxq.ir.meta import Deadline
from fxq.ir.ops import device_of, set_eval_
from fxq.kernels.lfh import LFHReducer
from fxq.kernels.lfh_reduce import RunningStats, merge_stats

__all__ = ["LFHTraces", "lfh_traces", "log_normalize", "probe", "probe_points"]


class _Tap(Interpreter):
    """Runs the graph and hooks each interest tensor's gradient: interest tensor i's goes to row i of `reducer`."""

    def __init__(self, gm: GraphModule, z: list[Node], reducer: LFHReducer):
        super().__init__(gm)
        self.index = {n: i for i, n in enumerate(z)}
        self.reducer = reducer

    def run_node(self, n: Node):
        out = super().run_node(n)
        i = self.index.get(n)
        if i is not None:
            if not isinstance(out, Tensor) or not out.requires_grad:
                raise UnsupportedOp(f"lfh: interest tensor {n.format_node()} is not a differentiable tensor")
            out.register_hook(lambda g, i=i: self.reducer.add(i, g))  # add returns None: g is not replaced
        return out


def probe(shape: torch.Size, kind: Probe, gen: torch.Generator, device: torch.device) -> Tensor:
    if kind is Probe.RADEMACHER:
        return (torch.randint(0, 2, shape, generator=gen) * 2 - 1).float().to(device)
    return torch.randn(shape, generator=gen).to(device)


def log_normalize(traces: Tensor) -> Tensor:
    """lambda_z = log10(t_z) - min_z log10(t_z); a zero trace (dead tensor) counts as the smallest positive one."""
    logs = torch.log10(traces.clamp_min(traces[traces > 0].min() if (traces > 0).any() else 1e-30))
    return logs - logs.min()


@dataclass
class LFHTraces:
    """Per interest tensor (in the order given): the trace, its standard error, the loss weight lambda."""

    trace: list[float]
    stderr: list[float]
    weight: list[float]
    probes: list[int]  # probes used per image batch


@torch.enable_grad()  # backwards of the probes, whatever grad mode the caller is in (torch.compile's may be off)
def lfh_traces(
    gm: GraphModule,
    z: list[Node],
    images: Tensor,
    cfg: LFHConfig,
    progress: bool = True,
    deadline: Deadline | None = None,
    world: World = World(),
) -> LFHTraces:
    """The LFH trace of each tensor in `z` on `images`, averaged over images (parameters frozen meanwhile).
    With a run `deadline`, each batch stops at cfg.min_probes once LFH_SHARE of the budget is spent.

    In a data-parallel run every rank probes its part of each batch with the probes one process would give
    those images, the ranks' Welford states merge after every probe, and all stop at the same probe."""
    set_eval_(gm)
    frozen = [p for p in gm.parameters() if p.requires_grad]
    for p in frozen:  # activation gradients only: no weight-gradient work in the backward
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(cfg.seed)
    means, variances, weights, probes = [], [], [], []
    try:
        bar = tqdm(images.split(cfg.batch_size), desc="lfh", unit="batch", disable=not (progress and world.main))
        for x in bar:
            if len(x) < world.size:
                raise ConfigError(
                    f"lfh: a batch of {len(x)} images cannot be shared by {world.size} ranks; give the LFH at least "
                    f"as many images per batch as there are ranks (LFHConfig.images, batch_size)"
                )
            stats, used = _batch(gm, z, x, world, gen, cfg, deadline)
            means.append(stats.mean)
            variances.append(stats.variance() / stats.count)
            weights.append(x.shape[0])
            probes.append(used)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    w = torch.tensor(weights, dtype=torch.float64, device=means[0].device) / sum(weights)
    trace = (torch.stack(means) * w[:, None]).sum(0)  # mean over images
    stderr = ((torch.stack(variances) * w[:, None].square()).sum(0)).sqrt()
    return LFHTraces(trace.tolist(), stderr.tolist(), log_normalize(trace).tolist(), probes)


def _batch(
    gm: GraphModule, z: list[Node], x: Tensor, world: World, gen: torch.Generator, cfg: LFHConfig, deadline
) -> tuple[RunningStats, int]:
    """Probe one image batch until every trace's running mean settles (or max_probes, or the LFH's share of the
    run's time budget is spent); this rank takes its part of the batch."""
    p, n = cfg.probes_per_pass, len(x)
    part = world.part(n)
    mine = x[part].to(device_of(gm))
    xr = mine.repeat(p, *([1] * (x.dim() - 1))).requires_grad_(True)  # p probes share one backward
    # count >= min_probes * B  <=>  done >= min_probes: the device-side flags follow the same rule
    reducer = LFHReducer(len(z), xr.shape[0], mine.device, cfg.min_probes * n, cfg.rel_tol, cfg.flush_mib << 20)
    merged = _Merged(world, len(z), cfg)
    done = 0
    while done < cfg.max_probes:
        outs = probe_points(_Tap(gm, z, reducer).run(xr), xr.shape[0])
        probed = 0
        for out in outs:  # several outputs (a dict of heads): one probe over all of them together
            # the whole batch's probes, then this rank's rows: every image gets the probe one process would give it
            v = probe(torch.Size((p * n, *out.shape[1:])), cfg.probe, gen, out.device)
            v = v.view(p, n, *out.shape[1:])[:, part].reshape(out.shape)
            probed = probed + (out * v).sum()
        torch.autograd.grad(probed, xr)  # the hooks do the work; the input gradient is dropped
        reducer.finish()  # a tensor the output does not depend on has trace 0
        done += p
        late = done >= cfg.min_probes and deadline is not None and deadline.past_share(LFH_SHARE)
        if world.solo:  # one host sync per probe, none before min_probes
            settled = done >= cfg.min_probes and (late or reducer.converged())
        else:  # every probe: the ranks' states merged, the same decision on every rank
            settled = merged.update(reducer.stats, late) and done >= cfg.min_probes
        if settled:
            break
    stats = reducer.stats if world.solo else merged.stats
    if not math.isfinite(float(stats.mean.sum())):
        raise GraphCheckFailed("lfh: NaN/inf in the Hessian traces; check the input images and model weights")
    return stats, done


def probe_points(out, rows: int) -> list[Tensor]:
    """The model's float output tensors (one, or the leaves of a dict / list / tuple), each batch-first."""
    leaves = [t for t in tree_leaves(out) if isinstance(t, Tensor) and t.is_floating_point() and t.requires_grad]
    if not leaves or any(t.dim() == 0 or t.shape[0] != rows for t in leaves):
        raise UnsupportedOp(
            "lfh: the model's outputs (the probe point) must be float tensors with the batch as their first "
            "dimension; wrap the model so that it returns them"
        )
    return leaves


class _Merged:
    """Every rank's running statistics of one batch merged after each probe, and the convergence rule of the
    one-process run (kernels/lfh_reduce.fold_: each mean moved by less than rel_tol) applied to the merged means;
    the caller holds the minimum probe count."""

    def __init__(self, world: World, n_z: int, cfg: LFHConfig):
        self.world, self.cfg = world, cfg
        self.stats = RunningStats.zeros(n_z)

    def update(self, local: RunningStats, late: bool) -> bool:
        """Merge this probe's states; True when every trace has settled, or any rank is out of time."""
        mine = torch.cat([local.count, local.mean, local.m2, torch.tensor([float(late)], dtype=torch.float64)])
        parts = self.world.gather(mine.cpu()[None], "the LFH's merge")
        n_z = len(local.count)
        merged = merge_stats([RunningStats(*t[0, : 3 * n_z].split(n_z)) for t in parts])
        moved = (merged.mean - self.stats.mean).abs() / merged.mean.abs().clamp_min(1e-30)
        self.stats = merged
        converged = bool((moved < self.cfg.rel_tol).all())  # NaN never converges
        return converged or any(bool(t[0, -1]) for t in parts)
