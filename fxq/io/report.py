"""The run report: per-layer bits and thresholds, stage times, accuracy; a terminal table and atomic JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

from torch import nn
from torch.fx import GraphModule, Node

from fxq.dist.world import World
from fxq.io.files import write_json_atomic
from fxq.ir.meta import gq, q
from fxq.quant.modules import ActQuant, QuantWeight

if TYPE_CHECKING:
    from fxq.config import PTQConfig

__all__ = ["LayerReport", "Report", "build_report"]


@dataclass
class LayerReport:
    node: str
    kind: str
    module: str | None = None
    weight_bits: int | None = None
    weight_grid_bits: int | None = None  # the grid within those bits (narrower where the target's ISA caps it)
    weight_shape: list[int] | None = None
    bias_bits: int | None = None  # integer bias width (None: float bias)
    w_threshold: dict[str, float] | None = None  # min / mean / max over output channels
    act_bits: int | None = None
    act_signed: bool | None = None
    act_range: list[float] | None = None
    act_threshold: float | None = None
    interest: bool = False
    lfh: float | None = None
    lfh_stderr: float | None = None
    lfh_weight: float | None = None


@dataclass
class Report:
    model: str
    target: str
    isa: str | None
    integer_form: str | None
    method: str
    frontend: str | None
    calib_images: int
    images: dict[str, str] = field(default_factory=dict)  # how each image set was drawn from its source
    settings: dict = field(default_factory=dict)  # how the quantizers were fitted (thresholds, bias correction)
    layers: list[LayerReport] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    accuracy: dict[str, dict] = field(default_factory=dict)  # run name -> {top1, top5, images, seconds}
    rounding: dict = field(default_factory=dict)  # EPTQ: iterations, seconds per step, loss history, RTN check
    lfh_probes: list[int] = field(default_factory=list)  # Hutchinson probes the LFH took per image batch
    mixed_precision: dict = field(default_factory=dict)  # options, budgets, ILP time, chosen bits per layer

    @staticmethod
    def of_parts(model: str, parts: dict[str, Report], left_float: dict[str, str]) -> Report:
        """One report for a model quantized part by part (fxq.frontend.parts): every part's layers, named by the
        part's path; `left_float`: the parts that run float and why."""
        first = next(iter(parts.values()))
        layers = []
        for path, r in parts.items():
            for lr in r.layers:
                layers.append(
                    replace(lr, node=f"{path}.{lr.node}", module=f"{path}.{lr.module}" if lr.module else None)
                )
        stage_seconds: dict[str, float] = {}
        for r in parts.values():
            for k, v in r.stage_seconds.items():
                stage_seconds[k] = stage_seconds.get(k, 0.0) + v
        settings = dict(first.settings)
        settings["parts"] = {path: {"frontend": r.frontend, "method": r.method} for path, r in parts.items()}
        settings["float_parts"] = dict(left_float)
        return Report(
            model=model,
            target=first.target,
            isa=first.isa,
            integer_form=first.integer_form,
            method=first.method,
            frontend="parts",
            calib_images=first.calib_images,
            settings=settings,
            layers=layers,
            stage_seconds=stage_seconds,
        )

    def table(self) -> str:
        """A readable per-layer table for the terminal."""
        rows = [("node", "kind", "W bits", "W thr (min..max)", "A bits", "A range", "A thr", "Z")]
        for lr in self.layers:
            wt = f"{lr.w_threshold['min']:.3g}..{lr.w_threshold['max']:.3g}" if lr.w_threshold else ""
            ar = f"{lr.act_range[0]:.3g}..{lr.act_range[1]:.3g}" if lr.act_range else ""
            ab = f"{lr.act_bits}{'s' if lr.act_signed else 'u'}" if lr.act_bits else ""
            rows.append(
                (
                    lr.node,
                    lr.kind,
                    _weight_bits(lr),
                    wt,
                    ab,
                    ar,
                    f"{lr.act_threshold:.4g}" if lr.act_threshold else "",
                    "*" if lr.interest else "",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)

    def to_dict(self) -> dict:
        return asdict(self)

    def write_json(self, path: str) -> None:
        write_json_atomic(path, self.to_dict())


def _weight_bits(lr: LayerReport) -> str:
    """'8', or '8 (7)' for an 8-bit weight on a 7-bit grid."""
    if not lr.weight_bits:
        return ""
    grid = lr.weight_grid_bits
    return f"{lr.weight_bits}" if grid in (None, lr.weight_bits) else f"{lr.weight_bits} ({grid})"


def _quantizers(gm: GraphModule) -> dict[Node, nn.Module]:
    """The fake-quant module holding each node's step: its QuantWeight, or the ActQuant after its output."""
    out: dict[Node, nn.Module] = {}
    for n in gm.graph.nodes:
        mod = gm.get_submodule(n.target) if n.op == "call_module" else None
        if isinstance(mod, QuantWeight):
            out[n] = mod
        elif isinstance(mod, ActQuant) and q(n).observes is not None:
            out[q(n).observes] = mod
    return out


def _layer(node: Node, quantizers: dict[Node, nn.Module]) -> LayerReport | None:
    m = q(node)
    if m.wspec is None and m.aspec is None and not m.interest:
        return None
    lr = LayerReport(
        node=node.name,
        kind=m.kind.value if m.kind else "?",
        interest=m.interest,
        lfh=m.lfh,
        lfh_stderr=m.lfh_stderr,
        lfh_weight=m.lfh_weight,
    )
    if node.op == "call_module":
        lr.module = str(node.target)
    mod = quantizers.get(node)
    if m.wspec is not None:
        lr.weight_bits, lr.bias_bits = m.wspec.bits, m.bias_bits
        lr.weight_grid_bits = m.wspec.grid_bits
        if isinstance(mod, QuantWeight):  # the threshold: the module's step times the levels it spans
            t = mod.scale.float() * mod.spec.levels_per_threshold
            lr.w_threshold = {"min": float(t.min()), "mean": float(t.mean()), "max": float(t.max())}
    if m.aspec is not None:
        lr.act_bits, lr.act_signed = m.aspec.bits, m.aspec.signed
        lr.act_range = list(m.act_range) if m.act_range else None
        act = mod if isinstance(mod, ActQuant) else quantizers.get(m.fused_into) if m.fused_into else None
        if isinstance(act, ActQuant):
            lr.act_threshold = float(act.scale) * act.spec.levels_per_threshold
    return lr


def build_report(gm: GraphModule, cfg: PTQConfig, model_name: str) -> Report:
    g = gq(gm)
    quantizers = _quantizers(gm)
    layers = [lr for lr in (_layer(n, quantizers) for n in gm.graph.nodes) if lr is not None]
    for lr in layers:
        if lr.weight_bits is not None and lr.module:
            mod = gm.get_submodule(lr.module)
            lr.weight_shape = list(getattr(mod, "layer", mod).weight.shape)
    return Report(
        model=model_name,
        target=cfg.target.label,
        isa=cfg.target.isa.value if cfg.target.isa else None,
        integer_form=cfg.target.isa.form if cfg.target.isa else None,
        method=cfg.method.value,
        frontend=g.frontend,
        calib_images=g.calib_images,
        settings={
            "act_threshold": cfg.act_threshold.value,
            "weight_error": cfg.weight_error.value,
            "weight_grid": cfg.weight_grid,
            "bias_correction": cfg.bias_correction,
            "bias_bits": cfg.target.bias_bits,
            "time_budget_s": cfg.time_budget,
            "ranks": World.current().size,  # processes of a data-parallel run (fxq.dist)
        },
        layers=layers,
        stage_seconds=dict(g.stage_seconds),
        rounding=dict(g.rounding),
        lfh_probes=list(g.lfh_probes),
        mixed_precision=g.mixed_precision.to_dict() if g.mixed_precision else {},
    )
