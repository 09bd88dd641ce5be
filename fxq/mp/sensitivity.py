"""Mixed-precision sensitivities: how far the interest tensors and the output move when only one layer's weight
(or one activation) is quantized at a width, everything else float.

The distance is LFH-weighted (or plainly averaged, or the output's alone), measured on a few calibration images.
Every node's float value is computed once (fxq.ir.downstream); each layer then re-runs only the nodes below it.
On a GPU all its candidate widths can go stacked along the batch dimension (one pass per layer; a size read off
the batch is read again), falling back to one pass per candidate where the graph does not broadcast over a
stacked batch. On a CPU one pass per candidate is the default.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from tqdm.auto import tqdm

from fxq.config import LossWeights, MixedPrecisionConfig
from fxq.data.images import batch_inputs
from fxq.dist.world import World
from fxq.eptq.distillation import distillation_loss
from fxq.eptq.weights import interest_weights
from fxq.errors import GraphCheckFailed
from fxq.ir.downstream import Downstream
from fxq.ir.meta import q
from fxq.ir.ops import device_of
from fxq.ir.taps import interest_nodes
from fxq.quant.convert import fit_activation, fit_weight, input_energy
from fxq.quant.modules import ActObserver, ActQuant, layer_forward, mean_output_shift
from fxq.quant.qmath import ActThreshold, QSpec, WeightError, fake_quant, scale_for

__all__ = [
    "SensitivitySettings",
    "SensitivityMeter",
    "weight_layers",
    "activation_sites",
    "sensitivity_measures",
    "returns_class_scores",
    "first_images",
    "output_with",
    "activation_quantizer",
    "macs",
]


def weight_layers(gm: GraphModule) -> list[Node]:
    """Nodes whose weight gets a quantizer (conv / linear modules), in graph order."""
    return [n for n in gm.graph.nodes if q(n).wspec is not None and n.op == "call_module"]


def activation_sites(gm: GraphModule) -> list[Node]:
    """Nodes whose output gets a quantizer (what Observe observes), in graph order."""
    return [n for n in gm.graph.nodes if q(n).aspec is not None]


def activation_quantizer(v: Tensor, spec: QSpec, method: ActThreshold) -> ActQuant:
    """The activation quantizer Quantize would fit at spec's width had calibration seen only `v`."""
    obs = ActObserver()
    obs(v)
    return ActQuant(*fit_activation(obs, spec, method)).to(v.device)


def channel_dims(x: Tensor, layer: nn.Module) -> list[int]:
    """The dims of a layer input to reduce over for per-input-channel statistics."""
    dim = x.dim() - 1 if isinstance(layer, nn.Linear) else 1
    return [d for d in range(x.dim()) if d != dim]


def output_with(layer: nn.Module, x: Tensor, wq: Tensor, x_mean: Tensor | None) -> Tensor:
    """The layer's output on x with weight wq and, given x's channel means, its bias corrected for them."""
    w = layer.weight.detach()
    bias = layer.bias.detach() if layer.bias is not None else torch.zeros(w.shape[0], device=w.device)
    if x_mean is not None:
        bias = bias - mean_output_shift(layer, (wq - w).float(), x_mean).to(bias.dtype)
    return layer_forward(layer, x, wq, bias)


@dataclass(frozen=True)
class SensitivitySettings:
    """How the quantized candidates are made: as Quantize would make them."""

    n_grid: int = 64
    act_threshold: ActThreshold = ActThreshold.MSE
    weight_error: WeightError = WeightError.MSE
    bias_correction: bool = True


class SensitivityMeter:
    """Measures every weight layer (and, with activation widths to choose, every activation site) at every width,
    under every measure, on the first `config.images` images of `batches`; writes NodeQ.sensitivity,
    NodeQ.act_sensitivity and NodeQ.macs.

    In a data-parallel run the layers and sites go round-robin to the ranks, each measured whole by one rank,
    and the table is summed over the ranks before anyone reads it: every rank holds one process's table."""

    def __init__(
        self,
        batches,
        config: MixedPrecisionConfig,
        settings: SensitivitySettings,
        progress: bool = True,
        world: World = World(),
    ):
        self.batches, self.cfg, self.s, self.progress, self.world = batches, config, settings, progress, world
        self._weights_q: dict[Node, list[Tensor]] = {}
        self._acts_q: dict[Node, list[ActQuant]] = {}
        self._keep: set[Node] = set()

    def run(self, gm: GraphModule) -> dict:
        """Measure; returns {measures, sensitivity_images, stacked_layers} for the graph's record."""
        options = tuple(sorted(set(self.cfg.bit_options)))
        act_options = tuple(sorted(set(self.cfg.act_bit_options or ())))
        layers = weight_layers(gm)
        acts = activation_sites(gm) if act_options else []
        z = interest_nodes(gm)
        measures = sensitivity_measures(gm, self.cfg)
        totals = {n: np.zeros((len(options), len(measures))) for n in layers}
        act_totals = {n: np.zeros((len(act_options), len(measures))) for n in acts}
        x_all = first_images(self.batches, self.cfg.images).to(device_of(gm))
        chunks = x_all.split(self.cfg.batch_size)
        w = self.world
        mine = {n for i, n in enumerate(layers + acts) if w.owns(i)}
        bar = tqdm(
            total=len(mine) * len(chunks), desc="sensitivity", unit="layer", disable=not (self.progress and w.main)
        )
        stacked = 0
        stack = x_all.is_cuda if self.cfg.stack_candidates is None else self.cfg.stack_candidates
        for x in chunks:
            run = Downstream(gm, x)
            out_is_tensor = isinstance(run.out, Tensor)
            taps = ([None] if out_is_tensor else []) + z
            if not taps:
                raise GraphCheckFailed(
                    "sensitivity: nothing to measure: the model returns no single tensor and has no interest "
                    "points (linear-op outputs); return the tensor to quantize for, or set bits per layer by hand"
                )
            # one row per measure: every measure weighs the same re-runs
            weights = torch.stack([interest_weights(gm, m, out_is_tensor) for m in measures]).to(x.device)
            zf = [run.out if t is None else run.float_env[t] for t in taps]
            tapped = [returned(gm) if t is None else t for t in taps]  # the nodes whose values are compared
            used = weights.gt(0).any(0).tolist()
            self._keep = {n for n, u in zip(tapped, used) if u}
            for node in layers:
                if node in mine:
                    d, ok = self._layer(gm, run, node, options, tapped, zf, weights, stack)
                    totals[node] += d * x.shape[0]
                    stacked += ok
                    bar.update()
            for node in acts:
                if node in mine:
                    act_totals[node] += self._activation(run, node, act_options, tapped, zf, weights) * x.shape[0]
                    bar.update()
        bar.close()
        if not w.solo:  # each cell was measured by one rank and is 0 on the others: the sum is exact
            tables = [*totals.values(), *act_totals.values()]
            flat = w.sum_(torch.from_numpy(np.concatenate([t.ravel() for t in tables])), "the sensitivity table")
            for t, part in zip(tables, flat.split([t.size for t in tables])):
                t[...] = part.numpy().reshape(t.shape)
            stacked = int(w.sum_(torch.tensor([stacked]), "the sensitivity table"))

        def per_measure(table: np.ndarray, widths) -> dict[str, dict[int, float]]:
            return {m.value: dict(zip(widths, (table[:, k] / len(x_all)).tolist())) for k, m in enumerate(measures)}

        for node in acts:
            q(node).act_sensitivity = per_measure(act_totals[node], act_options)
        for node in layers:
            q(node).sensitivity = per_measure(totals[node], options)
            q(node).macs = macs(gm.get_submodule(node.target), run.float_env[node])
        return {
            "measures": [m.value for m in measures],
            "sensitivity_images": len(x_all),
            "stacked_layers": stacked // len(chunks),
        }

    def _layer(self, gm, run: Downstream, node: Node, options, tapped, zf, weights, stack) -> tuple[np.ndarray, bool]:
        layer = gm.get_submodule(node.target)
        x = run.float_env[node.args[0]]
        if node not in self._weights_q:  # the threshold search once per layer and width, not once per batch
            self._weights_q[node] = self._quantized_weights(layer, x, q(node).wspec, options)
        x_mean = x.float().mean(channel_dims(x, layer)) if self.s.bias_correction else None  # once for all widths
        outs = [output_with(layer, x, wq, x_mean) for wq in self._weights_q[node]]
        below = run.below(node)
        if stack:
            try:
                changed = run.rerun(node, torch.cat(outs), below, len(options), self._keep)
                per = [_distances(changed, tapped, zf, weights, len(options), i) for i in range(len(options))]
                return np.array(per), True
            except RuntimeError:  # the graph does not broadcast over stacked candidates: one pass each
                pass
        per = [_distances(run.rerun(node, out, below, 1, self._keep), tapped, zf, weights, 1, 0) for out in outs]
        return np.array(per), False

    def _quantized_weights(self, layer: nn.Module, x: Tensor, spec: QSpec, options) -> list[Tensor]:
        """The layer's weight at each width as Quantize makes it (input statistics from this batch)."""
        energy = None
        if self.s.weight_error is WeightError.OUTPUT:
            xf, dims = x.float(), channel_dims(x, layer)
            energy = input_energy(xf.mean(dims), xf.square().mean(dims), self.s.bias_correction)
        w = layer.weight.detach()
        out = []
        for b in options:
            s = spec.with_bits(b)
            out.append(fake_quant(w, scale_for(fit_weight(layer, s, self.s.n_grid, energy), s), s))
        return out

    def _activation(self, run: Downstream, node: Node, options, tapped, zf, weights) -> np.ndarray:
        value = run.float_env[node]
        if node not in self._acts_q:  # thresholds from the first batch, then kept
            self._acts_q[node] = [
                activation_quantizer(value, q(node).aspec.with_bits(b), self.s.act_threshold) for b in options
            ]
        below = run.below(node)
        per = []
        for quantizer in self._acts_q[node]:
            changed = run.rerun(node, quantizer(value), below, 1, self._keep)
            per.append(_distances(changed, tapped, zf, weights, 1, 0))
        return np.array(per)


def _distances(changed, tapped: list[Node], zf, weights, copies: int, i: int) -> np.ndarray:
    """The weighted distance under each measure (one per row of `weights`)."""
    zq = []
    for t, f in zip(tapped, zf):
        v = changed.get(t)
        zq.append(f if v is None else v.chunk(copies)[i] if copies > 1 else v)
    return distillation_loss(zf, zq, weights).cpu().numpy()


def returned(gm: GraphModule):
    """What the graph returns: the output node's argument (a Node, or a tuple/dict of them)."""
    return next(n for n in gm.graph.nodes if n.op == "output").args[0]


def returns_class_scores(gm: GraphModule) -> bool:
    """Whether the graph returns one float tensor with a class dim (N, C, ...), C >= 2: the output the
    output measure and a top-1 agreement check make sense on (from the shapes PropagateShapes recorded)."""
    out = returned(gm)
    meta = out.meta.get("tensor_meta") if isinstance(out, Node) else None
    shape = getattr(meta, "shape", None)
    return shape is not None and len(shape) >= 2 and shape[1] >= 2 and meta.dtype.is_floating_point


def sensitivity_measures(gm: GraphModule, cfg: MixedPrecisionConfig) -> tuple[LossWeights, ...]:
    """The measures to weigh the sensitivities under: cfg's, or with select_from=None the configured one plus
    the output measure where the model returns class scores (chosen among by SelectAllocation)."""
    if cfg.select_from is not None:
        return cfg.measures
    auto = (LossWeights.OUTPUT,) if returns_class_scores(gm) else ()
    return tuple(dict.fromkeys((cfg.loss_weights, *auto)))


def first_images(batches, n: int) -> Tensor:
    """The first n inputs of `batches`, without concatenating the batches past them."""
    xs, have = [], 0
    for b in batches:
        if have >= n:
            break
        xs.append(batch_inputs(b))
        have += len(xs[-1])
    return torch.cat(xs)[:n]


def macs(layer: nn.Module, out: Tensor) -> int:
    """Multiply-accumulates per image of a conv or linear layer."""
    per_output = layer.weight[0].numel()  # Cin/groups * kernel, or in_features
    return int(out[0].numel() * per_output)
