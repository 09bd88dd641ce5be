"""Front-ends: turn an nn.Module into the one IR every pass sees, a torch.fx GraphModule."""

from __future__ import annotations

import copy
import os
import traceback
from enum import Enum
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Tracer
from torch.utils._pytree import tree_map

from fxq.errors import TraceFailed
from fxq.frontend.mha import TraceableMHA
from fxq.ir.meta import gq

__all__ = ["Frontend", "trace"]


class Frontend(Enum):
    AUTO = "auto"  # fx, and export where symbolic tracing fails (Python control flow on shapes or values)
    FX = "fx"  # torch.fx.symbolic_trace: keeps nn modules as call_module nodes
    EXPORT = "export"  # torch.export: ATen-level graph, handles data-dependent Python better


class _PathTracer(Tracer):
    """symbolic_trace with user leaf modules, remembering which module was being traced when it failed."""

    def __init__(self, leaf_modules: tuple[type | str, ...] = ()):  # no-arg: GraphModule unpickling builds one
        super().__init__()
        self._leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
        self._leaf_names = {t for t in leaf_modules if isinstance(t, str)}
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self._leaf_types) or qualname in self._leaf_names or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # innermost module first
                self.failed_in = self.path_of_module(m) or "<root>"
            raise


# frames that are not the model's: torch's own (with the separator: torchvision's are the model's), fxq's,
# and code torch generates ('<string>', '<eval_with_key>')
_NOT_THE_MODELS = (
    os.path.dirname(torch.__file__) + os.sep,
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
)


def _user_frame(exc: BaseException) -> str:
    """file:line of the innermost frame of the model's own code, i.e. the model source line that failed to trace."""
    frames = [
        f
        for e in _chain(exc)
        for f in traceback.extract_tb(e.__traceback__)
        if not f.filename.startswith(_NOT_THE_MODELS) and not f.filename.startswith("<")
    ]
    if not frames:
        return "<unknown source line>"
    f = frames[-1]
    return f"{f.filename}:{f.lineno} ({(f.line or '').strip()})"


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and those it was raised from or during, outermost first (torch.export re-raises)."""
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.insert(0, exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of the message, cut at `limit` characters (export's can hold a whole symbolic graph)."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _expose_attention(model: nn.Module, leaf_modules: tuple) -> nn.Module:
    """A copy of `model` with each nn.MultiheadAttention (an opaque leaf to symbolic_trace) in traceable form."""
    found = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention) and n not in leaf_modules and m.bias_k is None and not m.add_zero_attn
    ]
    if not found:
        return model
    model = copy.deepcopy(model)
    for name in found:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, TraceableMHA(model.get_submodule(name)))
    return model


def _trace_fx(model: nn.Module, leaf_modules: tuple, concrete_args: dict[str, Any] | None) -> GraphModule:
    model = _expose_attention(model, leaf_modules)
    tracer = _PathTracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as e:
        where = tracer.failed_in or "<root>"
        cls = type(model.get_submodule(where) if where != "<root>" else model).__name__
        # keeping the failing module whole only helps below the root: the root whole would quantize nothing
        leaf = f"keep '{where}' whole with leaf_modules=('{where}',) (its weights then stay float)"
        cause = f"symbolic_trace failed in module '{where}' ({cls}) at {_user_frame(e)}: {_first_line(e)}"
        failed = TraceFailed(
            f"{cause}. Try frontend='export' (--frontend export){', or ' + leaf if where != '<root>' else ''}."
        )
        failed.cause, failed.leaf_remedy = cause, leaf if where != "<root>" else None
        raise failed from e
    return GraphModule(tracer.root, graph, type(model).__name__)


def _trace_export(model: nn.Module, example_inputs: tuple) -> GraphModule:
    if not example_inputs:
        raise TraceFailed("frontend 'export' needs example inputs (a batch of the model's input)")
    # a dynamic batch for every tensor, in lists too (a detection head takes a list of feature maps)
    dims = tree_map(
        lambda x: {0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) else None, tuple(example_inputs)
    )
    try:
        ep = torch.export.export(model, tuple(example_inputs), dynamic_shapes=dims, strict=False)
    except Exception as e:
        cause = f"torch.export failed at {_user_frame(e)}: {_first_line(e)}"
        failed = TraceFailed(
            f"{cause}. Try frontend='fx' (--frontend fx). If both fail on data-dependent code (a detector's box decoding and "
            f"NMS), quantize the part that traces: the backbone and heads, with that code kept float"
        )
        failed.cause = cause
        raise failed from e
    return ep.module()


def _trace_either(
    model: nn.Module, example_inputs: tuple, leaf_modules: tuple, concrete_args: dict[str, Any] | None
) -> tuple[GraphModule, Frontend]:
    try:
        return _trace_fx(model, leaf_modules, concrete_args), Frontend.FX
    except TraceFailed as fx_failed:
        if not example_inputs:
            raise
        try:
            return _trace_export(model, example_inputs), Frontend.EXPORT
        except TraceFailed as export_failed:
            leaf = fx_failed.leaf_remedy
            raise TraceFailed(
                f"neither front-end traced the model: {fx_failed.cause}; {export_failed.cause}. "
                + (f"Try leaf_modules: {leaf}. " if leaf else "")
                + "If the failing code is post-processing (a detector's box decoding and NMS), quantize the part "
                "that traces (the backbone and heads) and keep that code float"
            ) from export_failed


def trace(
    model: nn.Module,
    example_inputs: tuple = (),
    frontend: Frontend | str = Frontend.FX,
    leaf_modules: tuple[type | str, ...] = (),
    concrete_args: dict[str, Any] | None = None,
) -> GraphModule:
    """Trace `model` (in eval mode) into a GraphModule; the model itself is not changed.

    Example:
        gm = trace(torchvision.models.resnet18().eval())
        gm = trace(model, (torch.randn(1, 3, 224, 224),), frontend="export")

    frontend="auto" tries symbolic tracing, then torch.export (which needs `example_inputs`); the graph records
    which one traced it.
    """
    if not isinstance(model, nn.Module):
        raise TraceFailed(f"expected an nn.Module, got {type(model).__name__}")
    frontend = Frontend(frontend)
    if isinstance(model, GraphModule):
        gm = model
    elif frontend is Frontend.FX:
        gm = _trace_fx(model, tuple(leaf_modules), concrete_args)
    elif frontend is Frontend.EXPORT:
        gm = _trace_export(model, tuple(example_inputs))
    else:
        gm, frontend = _trace_either(model, tuple(example_inputs), tuple(leaf_modules), concrete_args)
    gq(gm).frontend = frontend.value
    gq(gm).leaf_modules = tuple(leaf_modules)
    return gm
