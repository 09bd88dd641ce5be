"""Integer lowering for Inductor: the fxq graph in PT2E's Q/DQ form, compiled to oneDNN int8 kernels on x86.

fxq's graph computes in float with fake quantizers. PT2E's representation spells the same numbers with explicit
ops: `quantize_per_tensor -> dequantize_per_tensor` on activations (uint8 codes) and `dequantize_per_channel` of
int8 weight codes. torchao's x86 Inductor passes (registered when torchao's X86InductorQuantizer module is
imported) match `dequant -> conv/linear [-> unary] -> quant` in a frozen graph and replace it with oneDNN's
integer convolutions and matmuls; the rest (adds, pools, requantization) Inductor fuses as usual.

    int8 = fxq.compile_int8(quantized.model)   # a torch.compile'd callable; first call compiles
    int8(x)
    fxq.package_int8(quantized.model, (x,), "model_int8.pt2", check_inputs=calib)   # AOTInductor package

Signed activation grids [-2^(b-1), 2^(b-1) - 1] ship as uint8 with zero point 2^(b-1) (the same values; the x86
kernels take u8 activations with s8 weights). Weights narrower than 8 bits ship as int8 holding their narrow grid.
Activation quantizers narrower than 8 bits stay fake-quantized (correct, not integer).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from fxq.backends.check import CheckLimits, ExportCheck, check_lowered, enforce
from fxq.backends.lowering import LoweredActivation, LoweredWeight, lowered_copy
from fxq.errors import ConfigError
from fxq.ir.ops import grid_source
from fxq.quant.modules import layer_forward

__all__ = [
    "to_qdq_form",
    "compile_int8",
    "package_int8",
    "int8_inductor_available",
    "register_int8_patterns",
    "freezing",
    "FrozenCompiled",
]


def _decomposed_ops():
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)

    return torch.ops.quantized_decomposed


class QDQActivation(nn.Module):
    """An 8-bit ActQuant as quantize -> dequantize on uint8 codes: the same grid, in PT2E's spelling."""

    def __init__(self, name: str, act: LoweredActivation):
        super().__init__()
        self.scale, self.zero_point, self.quant_max = act.scale, act.zero_point, act.quant_max

    def forward(self, x: Tensor) -> Tensor:
        ops = _decomposed_ops()
        q = ops.quantize_per_tensor.default(x, self.scale, self.zero_point, 0, self.quant_max, torch.uint8)
        return ops.dequantize_per_tensor.default(q, self.scale, self.zero_point, 0, self.quant_max, torch.uint8)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}, zero_point={self.zero_point}"


class DequantWeight(nn.Module):
    """A lowered weight as int8 codes + per-channel steps, dequantized in the graph (folded into the kernel later)."""

    def __init__(self, name: str, w: LoweredWeight):
        super().__init__()
        self.layer = w.layer
        self.register_buffer("codes", w.codes)
        self.register_buffer("scale", w.scale)
        self.register_buffer("zero_point", torch.zeros(w.scale.numel(), dtype=torch.int64))

    def forward(self, x: Tensor) -> Tensor:
        w = _decomposed_ops().dequantize_per_channel.default(
            self.codes, self.scale, self.zero_point, 0, -128, 127, torch.int8
        )
        return layer_forward(self.layer, x, w, self.layer.bias)


def _requantize_weighted_inputs_(gm: GraphModule) -> int:
    """Give every conv/linear whose input reaches it through value-moving ops a Q/DQ pair with the grid it is
    already on (exact: max-pooling or reshaping grid values keeps them on the grid), so the integer kernels
    match it. Returns how many were added."""
    added = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), DequantWeight):
            continue
        x = node.args[0]
        source = grid_source(gm, x, QDQActivation) if isinstance(x, Node) else None
        if source is None or source is x:
            continue
        with gm.graph.inserting_before(node):
            requant = gm.graph.call_module(source.target, (x,))
        node.replace_input_with(x, requant)
        added += 1
    return added


def to_qdq_form(qgm: GraphModule) -> GraphModule:
    """A copy of `qgm` (an fxq fake-quant graph) in PT2E's Q/DQ form. Same numbers up to rounding ties.
    Activation quantizers narrower than 8 bits stay fake-quantized (correct, not integer)."""
    gm = lowered_copy(qgm, DequantWeight, lambda name, a: QDQActivation(name, a) if a.bits == 8 else None)
    _requantize_weighted_inputs_(gm)
    gm.graph.lint()
    gm.recompile()
    return gm.eval()


def int8_inductor_available() -> bool:
    """True when torchao's x86 Inductor passes can be registered and oneDNN is present."""
    try:
        register_int8_patterns()
    except ConfigError:
        return False
    return True


def register_int8_patterns() -> None:
    """Import torchao's x86 Inductor passes, which register themselves with Inductor's freezing pass."""
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401  (registers the passes)
    except ImportError as e:
        raise ConfigError(
            "int8 Inductor lowering needs torchao's x86 passes: pip install 'fxq[inductor]' (or pip install torchao)"
        ) from e
    if not torch.backends.mkldnn.is_available():
        raise ConfigError("int8 Inductor lowering needs oneDNN (torch.backends.mkldnn), which this torch build lacks")


class FrozenCompiled:
    """A module torch.compile'd so that every call (and so every compile, recompiles for new shapes included)
    runs with Inductor's freezing on: weights become constants, which the integer patterns need to pack them
    (torch.compile's `options=` does not reach the stage that decides it). Inference only."""

    def __init__(self, module: nn.Module, dynamic: bool = False):
        self.module = module
        self._compiled = torch.compile(module, dynamic=dynamic)

    @torch.no_grad()
    def __call__(self, *args: Tensor) -> Tensor:
        with freezing():
            return self._compiled(*args)


def freezing():
    """Inductor's freezing, on for the duration (a config patch)."""
    import torch._inductor.config as inductor_config

    return inductor_config.patch(freezing=True)


def compile_int8(qgm: GraphModule, dynamic: bool = False) -> FrozenCompiled:
    """`qgm` lowered to integer kernels: its Q/DQ form compiled by Inductor with freezing. x86 CPU; the first
    call compiles."""
    register_int8_patterns()
    return FrozenCompiled(to_qdq_form(qgm), dynamic)


def package_int8(
    qgm: GraphModule,
    example_inputs: tuple[Tensor, ...],
    path: str | os.PathLike,
    check_inputs: Tensor | None = None,
    limits: CheckLimits = CheckLimits(),
    force: bool = False,
) -> ExportCheck:
    """Ahead-of-time: `qgm`'s Q/DQ form through torch.export (dynamic batch) and AOTInductor with the integer
    patterns, as a .pt2 package that `torch._inductor.aoti_load_package` runs without fxq. The package runs next
    to the reference on `check_inputs` (default: the example inputs) before it is written (atomically); a failed
    check raises ExportMismatch and writes nothing, unless `force`."""
    register_int8_patterns()
    form = to_qdq_form(qgm)
    (x, *rest) = example_inputs
    if x.shape[0] < 2:  # torch.export specialises a batch of 1
        x = x.expand(2, *x.shape[1:]).contiguous()
    batch = torch.export.Dim("batch", min=1, max=4096)
    tmp = f"{os.fspath(path)}.tmp.pt2"  # the packager wants the .pt2 suffix
    try:
        with torch.no_grad():
            program = torch.export.export(form, (x, *rest), dynamic_shapes=({0: batch}, *([None] * len(rest))))
            with freezing():
                torch._inductor.aoti_compile_and_package(program, package_path=tmp)
        run = torch._inductor.aoti_load_package(tmp)
        inputs = check_inputs if check_inputs is not None else example_inputs[0]
        check = check_lowered(qgm, run, inputs, "inductor-int8", limits)
        if not force:
            enforce(check, limits, "int8 package")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return check
