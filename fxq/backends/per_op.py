"""Per-op timing of a quantized graph: each quantized conv and linear alone, at its real input shape and widths,
on each backend next to its float op, against the machine's measured roofs.

Each op is lifted out of the graph with the input it sees on a real batch: its float layer alone, and the same
layer quantized alone (fxq's RTN at the op's weight and activation widths, calibrated on that input), so every
backend runs the op as it would inside the model: ONNX Runtime's integer kernels through a one-op QDQ export,
Inductor's oneDNN kernels through `compile_int8`. Achieved throughput is 2 x MACs per second; the traffic is
the op's minimum (input, weights, bias and output once, at their widths), so intensity = ops / bytes places it
under the roofline of `fxq.backends.peaks`.

JSON schema: `PER_OP_SCHEMA` (draft 2020-12), documented beside it; `to_rows` gives the CSV's rows.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn
from torch.fx import GraphModule
from tqdm.auto import tqdm

from fxq.backends.latency import timing
from fxq.backends.peaks import Peaks
from fxq.config import PTQConfig
from fxq.errors import ConfigError
from fxq.ir.meta import gq, q
from fxq.quant.modules import QuantWeight

__all__ = [
    "OpCase",
    "OpTiming",
    "quantized_ops",
    "time_ops",
    "per_op_report",
    "to_rows",
    "OP_BACKENDS",
    "PER_OP_SCHEMA",
]

# float and quantized runner of each backend; "reference" is fxq's fake-quant module, timed against eager float
OP_BACKENDS = ("reference", "onnx", "inductor-int8")


@dataclass
class OpCase:
    """One quantized op of the graph, with the input it sees on a real batch."""

    node: str
    kind: str  # conv | linear
    layer: nn.Module  # its float layer (a copy)
    quant: QuantWeight  # the graph's own quantized module
    x: Tensor
    weight_bits: int
    act_bits: int
    groups: int
    out_shape: tuple[int, ...]

    @property
    def macs(self) -> int:
        """Each output (conv: per channel and pixel; linear: per feature) sums Cin/groups x kernel products."""
        return math.prod(self.out_shape) * math.prod(self.layer.weight.shape[1:])

    def traffic(self, quantized: bool) -> int:
        """Minimum bytes: input, weights, bias (int32 or fp32) and output once each."""
        w, cout = self.layer.weight, self.layer.weight.shape[0]
        if not quantized:
            return 4 * (self.x.numel() + w.numel() + cout + math.prod(self.out_shape))
        act = self.act_bits / 8
        return int(act * self.x.numel() + self.weight_bits / 8 * w.numel() + 4 * cout + act * math.prod(self.out_shape))


@dataclass
class OpTiming:
    node: str
    kind: str
    input_shape: list[int]
    weight_shape: list[int]
    groups: int
    weight_bits: int
    act_bits: int
    macs: int
    bytes_float: int
    bytes_quantized: int
    ms: dict[str, float] = field(default_factory=dict)  # runner -> median milliseconds
    spread_ms: dict[str, float] = field(default_factory=dict)  # runner -> interquartile range
    gops: dict[str, float] = field(default_factory=dict)
    peak_fraction: dict[str, float] = field(default_factory=dict)  # of the roof at this op's intensity


def quantized_ops(qgm: GraphModule, x: Tensor) -> list[OpCase]:
    """Every quantized conv and linear of `qgm` in graph order, with its input on the batch `x`."""
    modules = dict(qgm.named_modules())
    seen: dict[str, tuple[Tensor, tuple]] = {}
    hooks = []
    for n in qgm.graph.nodes:
        if n.op == "call_module" and isinstance(modules.get(n.target), QuantWeight):
            qw = modules[n.target]

            def grab(mod, args, out, name=n.target):
                seen.setdefault(name, (args[0].detach().clone(), tuple(out.shape)))

            hooks.append(qw.register_forward_hook(grab))
    try:
        with torch.no_grad():
            qgm(x)
    finally:
        for h in hooks:
            h.remove()
    specs = {n.target: n for n in qgm.graph.nodes if n.op == "call_module"}
    cases = []
    for name, (inp, out_shape) in seen.items():
        qw = modules[name]
        layer = copy.deepcopy(qw.layer).float().eval()
        kind = "linear" if isinstance(layer, nn.Linear) else "conv"
        act = _act_bits(specs[name])
        cases.append(OpCase(name, kind, layer, qw, inp, qw.spec.bits, act, getattr(layer, "groups", 1), out_shape))
    return cases


def _act_bits(node) -> int:
    a = q(node).aspec
    return a.bits if a is not None else 8


def _alone(case: OpCase, target) -> tuple[nn.Module, GraphModule]:
    """The op's float layer as a one-layer model, and that model quantized at the op's widths on its input."""
    from fxq.pipeline import quantize

    tiny = nn.Sequential(copy.deepcopy(case.layer)).eval()
    cfg = PTQConfig(target=target.with_bits(case.weight_bits, case.act_bits), bias_correction=False, progress=False)
    return tiny, quantize(tiny, [case.x], cfg).model


def _runners(case: OpCase, backend: str, alone, target, tmp: str) -> tuple[Callable, Callable]:
    """(float, quantized) callables of one op on one backend, each taking no argument. `alone()`: `_alone`'s
    pair, built on first use and shared by the backends."""
    x = case.x
    if backend == "reference":
        return partial(case.layer, x), partial(case.quant, x)
    tiny, tq = alone()
    if backend == "onnx":
        from fxq.backends.onnx import export_float_onnx, export_onnx, ort_session

        fpath, qpath = os.path.join(tmp, f"{case.node}.f.onnx"), os.path.join(tmp, f"{case.node}.q.onnx")
        export_float_onnx(tiny, (x,), fpath)
        export_onnx(tq, (x,), qpath, check_inputs=x, force=True, isa=target.isa)
        sf, sq = ort_session(fpath), ort_session(qpath)
        xn = x.numpy()
        return partial(sf.run, None, {"input": xn}), partial(sq.run, None, {"input": xn})
    if backend == "inductor-int8":
        from fxq.backends.inductor import FrozenCompiled, compile_int8

        return partial(FrozenCompiled(tiny), x), partial(compile_int8(tq), x)
    raise ConfigError(f"unknown per-op backend {backend!r}; choose from {', '.join(OP_BACKENDS)}")


def _roof(peaks: Peaks, intensity: float, quantized: bool) -> float:
    compute = peaks.int8_gops if quantized and peaks.int8_gops else peaks.fp32_gflops
    return min(compute, peaks.bandwidth_gbs * intensity)


def time_ops(
    cases: list[OpCase],
    backends=("reference",),
    peaks: Peaks | None = None,
    target=None,
    iters: int = 20,
    progress: bool = True,
) -> list[OpTiming]:
    """Median and spread of each op's float and quantized runner on each backend, in the same run."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for case in tqdm(cases, desc="per-op", unit="op", disable=not progress):
            row = OpTiming(
                case.node,
                case.kind,
                list(case.x.shape),
                list(case.layer.weight.shape),
                case.groups,
                case.weight_bits,
                case.act_bits,
                case.macs,
                case.traffic(False),
                case.traffic(True),
            )
            alone = functools.cache(partial(_alone, case, target))
            for b in backends:
                run_float, run_quant = _runners(case, b, alone, target, tmp)
                for side, fn in (("float", run_float), ("quantized", run_quant)):
                    key = f"{b}:{side}"
                    t = timing(fn, iters)
                    row.ms[key], row.spread_ms[key] = t.median_ms, t.iqr_ms
                    row.gops[key] = 2 * case.macs / (row.ms[key] * 1e-3) / 1e9
                    if peaks is not None:
                        q = side == "quantized" and b != "reference"  # the reference computes in fp32
                        intensity = 2 * case.macs / (row.bytes_quantized if q else row.bytes_float)
                        row.peak_fraction[key] = row.gops[key] / _roof(peaks, intensity, q)
            rows.append(row)
    return rows


def per_op_report(model_name: str, qgm: GraphModule, rows: list[OpTiming], peaks: Peaks, batch: int) -> dict:
    from dataclasses import asdict

    from fxq.targets import cpu_description

    target = gq(qgm).target
    return {
        "schema": "fxq-per-op/1",
        "model": model_name,
        "batch": batch,
        "isa": target.isa.value if target and target.isa else None,
        "cpu": cpu_description(),
        "threads": torch.get_num_threads(),
        "peaks": peaks.to_dict(),
        "ops": [asdict(r) for r in rows],
    }


def to_rows(report: dict) -> list[dict]:
    """Flat rows (one per op and runner) for a CSV."""
    out = []
    for op in report["ops"]:
        for key, ms in op["ms"].items():
            backend, side = key.split(":")
            out.append(
                {
                    "node": op["node"],
                    "kind": op["kind"],
                    "backend": backend,
                    "side": side,
                    "input_shape": "x".join(map(str, op["input_shape"])),
                    "weight_shape": "x".join(map(str, op["weight_shape"])),
                    "groups": op["groups"],
                    "weight_bits": op["weight_bits"],
                    "act_bits": op["act_bits"],
                    "macs": op["macs"],
                    "ms": ms,
                    "spread_ms": op["spread_ms"][key],
                    "gops": op["gops"][key],
                    "peak_fraction": op["peak_fraction"].get(key),
                }
            )
    return out


_NUM = {"type": "number"}
_MAP = {"type": "object", "additionalProperties": _NUM, "propertyNames": {"pattern": "^[a-z0-9-]+:(float|quantized)$"}}
_INTS = {"type": "array", "items": {"type": "integer"}}
PER_OP_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "fxq per-op timing report",
    "type": "object",
    "required": ["schema", "model", "batch", "isa", "cpu", "threads", "peaks", "ops"],
    "properties": {
        "schema": {"const": "fxq-per-op/1"},
        "model": {"type": "string"},
        "batch": {"type": "integer", "minimum": 1},
        "isa": {"type": ["string", "null"]},
        "cpu": {"type": "string"},
        "threads": {"type": "integer", "minimum": 1},
        "peaks": {
            "type": "object",
            "required": [
                "fp32_gflops",
                "int8_gops",
                "int8_kernel",
                "bandwidth_gbs",
                "gemm_size",
                "copy_mib",
                "threads",
            ],
            "properties": {k: _NUM for k in ("fp32_gflops", "int8_gops", "bandwidth_gbs")},
        },
        "ops": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": [
                    "node",
                    "kind",
                    "input_shape",
                    "weight_shape",
                    "groups",
                    "weight_bits",
                    "act_bits",
                    "macs",
                    "bytes_float",
                    "bytes_quantized",
                    "ms",
                    "spread_ms",
                    "gops",
                    "peak_fraction",
                ],
                "properties": {
                    "node": {"type": "string"},
                    "kind": {"enum": ["conv", "linear"]},
                    "input_shape": _INTS,
                    "weight_shape": _INTS,
                    "groups": {"type": "integer", "minimum": 1},
                    "weight_bits": {"type": "integer", "minimum": 2, "maximum": 16},
                    "act_bits": {"type": "integer", "minimum": 2, "maximum": 16},
                    "macs": {"type": "integer", "minimum": 1},
                    "bytes_float": {"type": "integer", "minimum": 1},
                    "bytes_quantized": {"type": "integer", "minimum": 1},
                    "ms": _MAP,
                    "spread_ms": _MAP,
                    "gops": _MAP,
                    "peak_fraction": _MAP,
                },
            },
        },
    },
}
