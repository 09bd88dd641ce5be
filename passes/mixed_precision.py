"""Mixed precision: per-layer weight bit-widths from an ILP over LFH-weighted sensitivities (METHOD.md s. 4).

Sensitivity of (layer l, width b): the LFH-weighted change of the interest tensors (and the output) when
only l's weight is quantized at b, everything else float, on a few calibration images. With
`act_bit_options`, every activation quantizer gets the same measurement per width (its MSE threshold taken
on the first batch of those images), and the ILP picks its width too. Every node's float
value is computed once; each layer then re-runs only the nodes downstream of it. On a GPU all its candidate
widths go stacked along the batch dimension (one pass per layer; a size read off the batch is read again),
falling back to one pass per candidate where the graph does not broadcast over a stacked batch. On a CPU one
pass per candidate is faster (measured on Lite0: stacking made the sensitivity phase slower), so that is the
default there. Results go to node.meta (NodeQ.bit_sensitivity), where
the ILP pass reads them, so a sweep over budgets measures once.
"""

from __future__ import annotations

import numpy as np
import torch
from fxq.passes.quantize import fit_activation, fit_weight, input_energy
from fxq.passes.rounding import interest_weights
from torch import Tensor, nn
from torch.fx import GraphModule, Interpreter, Node
from torch.fx.node import map_arg
from tqdm.auto import tqdm

from fxq.config import LossWeights, MixedPrecisionConfig
from fxq.data import batch_inputs
from fxq.distillation import distillation_loss
from fxq.errors import ConfigError, GraphCheckFailed
from fxq.ilp import Budget, solve_allocation
from fxq.meta import gq, q
from fxq.modules import ActObserver, ActQuant, layer_forward, mean_output_shift
from fxq.ops import device_of, set_eval_
from fxq.passbase import FxqPass, PassResult
from fxq.qmath import ActThreshold, QSpec, WeightError, fake_quant, scale_for
from fxq.taps import interest_nodes

__all__ = [
    "Sensitivity",
    "MixedPrecision",
    "apply_plan",
    "weight_layers",
    "activation_sites",
    "sensitivity_measures",
]


def weight_layers(gm: GraphModule) -> list[Node]:
    """Nodes whose weight gets a quantizer (conv / linear modules), in graph order."""
    return [n for n in gm.graph.nodes if q(n).wspec is not None and n.op == "call_module"]


def activation_sites(gm: GraphModule) -> list[Node]:
    """Nodes whose output gets a quantizer (what Observe observes), in graph order."""
    return [n for n in gm.graph.nodes if q(n).aspec is not None]


def _activation_quantizer(v: Tensor, spec: QSpec, method: ActThreshold) -> ActQuant:
    """The activation quantizer Quantize would fit at spec's width had calibration seen only `v`."""
    obs = ActObserver()
    obs(v)
    return ActQuant(*fit_activation(obs, spec, method)).to(v.device)


def _channel_dims(x: Tensor, layer: nn.Module) -> list[int]:
    """The dims of a layer input to reduce over for per-input-channel statistics."""
    dim = x.dim() - 1 if isinstance(layer, nn.Linear) else 1
    return [d for d in range(x.dim()) if d != dim]


def _output_with(layer: nn.Module, x: Tensor, wq: Tensor, x_mean: Tensor | None) -> Tensor:
    """The layer's output on x with weight wq and, given x's channel means, its bias corrected for them."""
    w = layer.weight.detach()
    bias = layer.bias.detach() if layer.bias is not None else torch.zeros(w.shape[0], device=w.device)
    if x_mean is not None:
        bias = bias - mean_output_shift(layer, (wq - w).float(), x_mean).to(bias.dtype)
    return layer_forward(layer, x, wq, bias)


class _Downstream(Interpreter):
    """The float values of every node for one batch, and re-runs of the part of the graph below one node."""

    def __init__(self, gm: GraphModule, x: Tensor):
        super().__init__(gm, garbage_collect_values=False)
        with torch.no_grad():
            self.out = self.run(x)
        self.float_env = dict(self.env)
        self.batch = x.shape[0]
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.batched = set(self._reach(inputs)) | set(inputs)  # hold a batch dim, or a size derived from one

    def below(self, node: Node) -> list[Node]:
        return sorted(self._reach([node]), key=self.order.__getitem__)

    @staticmethod
    def _reach(start: list[Node]) -> set[Node]:
        """Nodes downstream of `start` (the output node excluded)."""
        seen, stack = set(), list(start)
        while stack:
            for u in stack.pop().users:
                if u not in seen and u.op != "output":
                    seen.add(u)
                    stack.append(u)
        return seen

    @torch.no_grad()
    def rerun(self, node: Node, value: Tensor, below: list[Node], copies: int, keep: set[Node]) -> dict[Node, Tensor]:
        """Values of the `keep` nodes among `below` when `node` outputs `value` (`copies` candidates stacked along
        the batch). Every other value is dropped after its last use: holding all of them took ~18 GB on Lite0."""
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


class Sensitivity(FxqPass):
    """NodeQ.bit_sensitivity = {bits: LFH-weighted distance} for every weight layer; also NodeQ.macs."""

    def __init__(
        self,
        batches,
        config: MixedPrecisionConfig,
        n_grid: int = 64,
        progress: bool = True,
        act_threshold: ActThreshold = ActThreshold.MSE,
        weight_error: WeightError = WeightError.MSE,
        bias_correction: bool = True,
    ):
        self.batches, self.cfg = batches, config
        self.n_grid, self.progress, self.act_threshold = n_grid, progress, act_threshold
        self.weight_error, self.bias_correction = weight_error, bias_correction

    def requires(self, gm: GraphModule) -> None:
        if not weight_layers(gm):
            raise GraphCheckFailed("sensitivity: no weight quantizers annotated; run Annotate first")
        missing = [n.name for n in interest_nodes(gm) if q(n).lfh_weight is None]
        if missing and LossWeights.LFH in self.cfg.measures:
            raise GraphCheckFailed(f"sensitivity: no LFH weight on {missing[:3]}; run the LFH pass first")

    def call(self, gm: GraphModule) -> PassResult:
        set_eval_(gm)
        self._weights_q: dict[Node, list[Tensor]] = {}
        self._acts_q: dict[Node, list[ActQuant]] = {}
        options = tuple(sorted(set(self.cfg.bit_options)))
        act_options = tuple(sorted(set(self.cfg.act_bit_options or ())))
        layers = weight_layers(gm)
        acts = activation_sites(gm) if act_options else []
        z = interest_nodes(gm)
        measures = sensitivity_measures(gm, self.cfg)
        totals = {n: np.zeros((len(options), len(measures))) for n in layers}
        act_totals = {n: np.zeros((len(act_options), len(measures))) for n in acts}
        x_all = _first_images(self.batches, self.cfg.images).to(device_of(gm))
        chunks = x_all.split(self.cfg.batch_size)
        total = (len(layers) + len(acts)) * len(chunks)
        bar = tqdm(total=total, desc="sensitivity", unit="layer", disable=not self.progress)
        stacked = 0
        stack = x_all.is_cuda if self.cfg.stack_candidates is None else self.cfg.stack_candidates
        for x in chunks:
            run = _Downstream(gm, x)
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
            tapped = [_returned(gm) if t is None else t for t in taps]  # the nodes whose values are compared
            used = weights.gt(0).any(0).tolist()
            self._keep = {n for n, u in zip(tapped, used) if u}
            for node in layers:
                d, ok = self._layer(gm, run, node, options, tapped, zf, weights, stack)
                totals[node] += d * x.shape[0]
                stacked += ok
                bar.update()
            for node in acts:
                act_totals[node] += self._activation(run, node, act_options, tapped, zf, weights) * x.shape[0]
                bar.update()
        bar.close()

        def per_measure(table: np.ndarray, widths) -> dict[str, dict[int, float]]:
            return {m.value: dict(zip(widths, (table[:, k] / len(x_all)).tolist())) for k, m in enumerate(measures)}

        for node in acts:
            by = per_measure(act_totals[node], act_options)
            q(node).act_bit_sensitivity = by[measures[0].value]
            q(node).act_bit_sensitivity_by = by if len(measures) > 1 else None
        for node in layers:
            by = per_measure(totals[node], options)
            q(node).bit_sensitivity = by[measures[0].value]
            q(node).bit_sensitivity_by = by if len(measures) > 1 else None
            q(node).macs = _macs(gm.get_submodule(node.target), run.float_env[node])
        gq(gm).mixed_precision["measures"] = [m.value for m in measures]
        gq(gm).mixed_precision["sensitivity_images"] = len(x_all)
        gq(gm).mixed_precision["stacked_layers"] = stacked // len(chunks)
        return PassResult(gm, modified=False)

    def _layer(self, gm, run: _Downstream, node: Node, options, tapped, zf, weights, stack) -> tuple[np.ndarray, bool]:
        layer = gm.get_submodule(node.target)
        x = run.float_env[node.args[0]]
        if node not in self._weights_q:  # the threshold search once per layer and width, not once per batch
            self._weights_q[node] = self._quantized_weights(layer, x, q(node).wspec, options)
        x_mean = x.float().mean(_channel_dims(x, layer)) if self.bias_correction else None  # once for all widths
        outs = [_output_with(layer, x, wq, x_mean) for wq in self._weights_q[node]]
        below = run.below(node)
        if stack:
            try:
                changed = run.rerun(node, torch.cat(outs), below, len(options), self._keep)
                per = [self._distances(changed, tapped, zf, weights, len(options), i) for i in range(len(options))]
                return np.array(per), True
            except RuntimeError:  # the graph does not broadcast over stacked candidates: one pass each
                pass
        per = []
        for out in outs:
            per.append(self._distances(run.rerun(node, out, below, 1, self._keep), tapped, zf, weights, 1, 0))
        return np.array(per), False

    def _quantized_weights(self, layer: nn.Module, x: Tensor, spec: QSpec, options) -> list[Tensor]:
        """The layer's weight at each width as Quantize makes it (input statistics from this batch)."""
        energy = None
        if self.weight_error is WeightError.OUTPUT:
            xf, dims = x.float(), _channel_dims(x, layer)
            energy = input_energy(xf.mean(dims), xf.square().mean(dims), self.bias_correction)
        w = layer.weight.detach()
        out = []
        for b in options:
            s = spec.with_bits(b)
            out.append(fake_quant(w, scale_for(fit_weight(layer, s, self.n_grid, energy), s), s))
        return out

    def _activation(self, run: _Downstream, node: Node, options, tapped, zf, weights) -> np.ndarray:
        value = run.float_env[node]
        if node not in self._acts_q:  # thresholds from the first batch, then kept
            self._acts_q[node] = [
                _activation_quantizer(value, q(node).aspec.with_bits(b), self.act_threshold) for b in options
            ]
        below = run.below(node)
        per = []
        for quantizer in self._acts_q[node]:
            changed = run.rerun(node, quantizer(value), below, 1, self._keep)
            per.append(self._distances(changed, tapped, zf, weights, 1, 0))
        return np.array(per)

    @staticmethod
    def _distances(changed, tapped: list[Node], zf, weights, copies: int, i: int) -> np.ndarray:
        """The weighted distance under each measure (one per row of `weights`)."""
        zq = []
        for t, f in zip(tapped, zf):
            v = changed.get(t)
            zq.append(f if v is None else v.chunk(copies)[i] if copies > 1 else v)
        return distillation_loss(zf, zq, weights).cpu().numpy()


def _returned(gm: GraphModule):
    """What the graph returns: the output node's argument (a Node, or a tuple/dict of them)."""
    return next(n for n in gm.graph.nodes if n.op == "output").args[0]


def returns_class_scores(gm: GraphModule) -> bool:
    """Whether the graph returns one float tensor with a class dim (N, C, ...), C >= 2: the output the
    output measure and a top-1 agreement check make sense on (from the shapes PropagateShapes recorded)."""
    out = _returned(gm)
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


def _first_images(batches, n: int) -> Tensor:
    """The first n inputs of `batches`, without concatenating the batches past them."""
    xs, have = [], 0
    for b in batches:
        if have >= n:
            break
        xs.append(batch_inputs(b))
        have += len(xs[-1])
    return torch.cat(xs)[:n]


def _macs(layer: nn.Module, out: Tensor) -> int:
    """Multiply-accumulates per image of a conv or linear layer."""
    per_output = layer.weight[0].numel()  # Cin/groups * kernel, or in_features
    return int(out[0].numel() * per_output)


class MixedPrecision(FxqPass):
    """Solve the bit allocation and set NodeQ.bits on every weight layer."""

    def __init__(self, config: MixedPrecisionConfig, act_bits: int = 8):
        self.cfg, self.act_bits = config, act_bits

    def requires(self, gm: GraphModule) -> None:
        missing = [n.name for n in weight_layers(gm) if q(n).bit_sensitivity is None]
        if self.cfg.act_bit_options:
            missing += [n.name for n in activation_sites(gm) if q(n).act_bit_sensitivity is None]
        if missing:
            raise GraphCheckFailed(f"mixed precision: no sensitivities on {missing[:3]}; run Sensitivity first")

    def call(self, gm: GraphModule) -> PassResult:
        # as Sensitivity weighed them; sensitivities set by other means count as the configured measure's
        measures = gq(gm).mixed_precision.get("measures") or [self.cfg.loss_weights.value]
        plans = {m: self._plan(gm, m if len(measures) > 1 else None) for m in measures}
        apply_plan(gm, plans[measures[0]])
        if len(plans) > 1:  # SelectAllocation picks among them
            gq(gm).mixed_precision["candidates"] = plans
        return PassResult(gm, modified=True)

    def _plan(self, gm: GraphModule, measure: str | None) -> dict:
        """The ILP's allocation under one measure's sensitivities (None: the only one), as report fields."""
        layers = weight_layers(gm)
        acts = activation_sites(gm) if self.cfg.act_bit_options else []

        def sens(n: Node, act: bool) -> dict[int, float]:
            m = q(n)
            if measure is None:
                return m.act_bit_sensitivity if act else m.bit_sensitivity
            return (m.act_bit_sensitivity_by if act else m.bit_sensitivity_by)[measure]

        table = [sens(n, False) for n in layers] + [sens(n, True) for n in acts]
        w_opts = list(table[0])
        a_opts = list(table[len(layers)]) if acts else []
        options = sorted(set(w_opts) | set(a_opts))  # one column per width; each row allows its own widths
        allowed = np.array([[b in row for b in options] for row in table])
        cost = np.array([[row.get(b, 0.0) for b in options] for row in table])
        bits = np.array(options, dtype=np.float64)[None, :]
        numel = np.array([gm.get_submodule(n.target).weight.numel() for n in layers], dtype=np.float64)[:, None]
        act_numel = np.array([_per_image_numel(n) for n in acts], dtype=np.float64)[:, None]
        budgets = self._budgets(layers, numel, act_numel, bits, options, w_opts)
        alloc = solve_allocation(cost, budgets, allowed=allowed)
        chosen = [options[k] for k in alloc.choice]
        w_bits = np.array(chosen[: len(layers)], dtype=np.float64)
        plan = dict(
            measure=measure or self.cfg.loss_weights.value,
            options=w_opts,
            objective=alloc.objective,
            usage=alloc.usage,
            limits={b.name: b.limit for b in budgets},
            solve_seconds=alloc.seconds,
            weight_bytes=float((numel[:, 0] * w_bits).sum() / 8),
            avg_bits=float((numel[:, 0] * w_bits).sum() / numel.sum()),
            bits={n.name: b for n, b in zip(layers, chosen)},
        )
        if acts:
            a_bits = np.array(chosen[len(layers) :], dtype=np.float64)
            plan.update(
                act_options=a_opts,
                act_avg_bits=float((act_numel[:, 0] * a_bits).sum() / act_numel.sum()),
                act_bits={n.name: b for n, b in zip(acts, chosen[len(layers) :])},
            )
        return plan

    def _budgets(self, layers, numel, act_numel, bits, options, w_opts) -> list[Budget]:
        """Budget rows over the weight layers followed by the activation sites (zero usage where not theirs)."""
        c, n_acts = self.cfg, len(act_numel)

        def on_weights(usage: np.ndarray) -> np.ndarray:
            return np.vstack([usage, np.zeros((n_acts, usage.shape[1]))])

        memory = numel * bits / 8
        out = []
        if c.weight_memory is not None:
            out.append(Budget("weight memory (bytes)", on_weights(memory), c.weight_memory))
        if c.avg_bits is not None:
            limit = c.avg_bits * numel.sum() / 8
            out.append(Budget(f"weight memory (bytes, {c.avg_bits} bits/weight)", on_weights(memory), limit))
        if c.bops is not None:
            macs = np.array([q(n).macs for n in layers], dtype=np.float64)[:, None]
            out.append(Budget("BOPs", on_weights(macs * bits * self.act_bits), c.bops))
        if c.latency is not None:
            out.append(
                Budget("latency (ms)", on_weights(_latency_usage(c.latency_table, layers, options, w_opts)), c.latency)
            )
        if c.act_avg_bits is not None:
            usage = np.vstack([np.zeros((len(layers), len(options))), act_numel * bits / 8])
            limit = c.act_avg_bits * act_numel.sum() / 8
            out.append(Budget(f"activation bytes per image ({c.act_avg_bits} bits/value)", usage, limit))
        return out


def apply_plan(gm: GraphModule, plan: dict) -> None:
    """Set the widths of an allocation from MixedPrecision on gm's nodes, and its fields in the report."""
    act_bits = plan.get("act_bits", {})
    for n in gm.graph.nodes:
        if n.name in plan["bits"]:
            q(n).bits = plan["bits"][n.name]
        if n.name in act_bits:
            q(n).aspec = q(n).aspec.with_bits(act_bits[n.name])
    gq(gm).mixed_precision.update(plan)


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
