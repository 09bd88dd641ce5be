"""A torch.compile backend: fxq's passes on the graph Dynamo captures, then Inductor.

    qmodel = torch.compile(model, backend=fxq.backend(calib_batches, fxq.PTQConfig()), dynamic=False)
    qmodel(x)   # first call: capture, quantize (calibrating on calib_batches), compile with Inductor

Static shapes (dynamic=False): a new input shape recompiles, and the new graph is quantized again.

Dynamo hands a backend its parameters and buffers as graph inputs. The backend freezes them into the graph
(get_attr constants, so the normal passes see weights), quantizes the rest of the graph like any other front-end,
and returns a callable that takes Dynamo's full argument list. A model that Dynamo splits into several graphs
is refused: calibration batches feed the model's input, which only the first graph sees.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.fx import GraphModule

from fxq.backends.inductor import freezing, register_int8_patterns, to_qdq_form
from fxq.config import PTQConfig
from fxq.errors import UnsupportedOp
from fxq.ir.meta import gq
from fxq.pipeline import quantize_graph

__all__ = ["backend"]


def _freeze_parameters_(gm: GraphModule, example_inputs: list) -> list[int]:
    """Turn placeholders fed with parameters/buffers into get_attr constants; return the data inputs' positions."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    data = []
    for i, (node, value) in enumerate(zip(placeholders, example_inputs, strict=True)):
        if isinstance(value, nn.Parameter) or "_buffers_" in node.name or "_parameters_" in node.name:
            name = f"fxq_frozen_{i}"
            gm.register_buffer(name, value.detach())
            with gm.graph.inserting_before(node):
                const = gm.graph.get_attr(name)
            node.replace_all_uses_with(const)
            gm.graph.erase_node(node)
        else:
            data.append(i)
    gm.recompile()
    return data


def _unwrap_single_output_(gm: GraphModule) -> bool:
    """Make a graph returning a 1-tuple return its element; whether it did."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    value = out.args[0]
    if isinstance(value, (tuple, list)) and len(value) == 1:
        out.args = (value[0],)
        gm.recompile()
        return True
    return False


def backend(
    calib_data: Iterable, config: PTQConfig = PTQConfig(), inductor: bool = True, int8: bool = False
) -> Callable:
    """A torch.compile backend that quantizes the captured graph with `config`, calibrating on `calib_data`.

    inductor=False returns the fake-quant graph as is (the numeric reference); int8=True lowers it to integer
    kernels (Q/DQ form, Inductor with freezing, torchao's x86 patterns; see fxq.backends.inductor). Every graph it
    quantizes (the reference of what the compiled model runs) is kept in the returned function's `graphs`."""
    if int8:
        register_int8_patterns()
    batches = calib_data if hasattr(calib_data, "__len__") else list(calib_data)
    seen: list[tuple] = []  # the ops of the first graph: a recompile (new shapes) repeats them, a graph break not

    def compile_fn(gm: GraphModule, example_inputs: list) -> Callable:
        ops = tuple(str(n.target) for n in gm.graph.nodes if n.op.startswith("call"))
        if seen and ops != seen[0]:
            raise UnsupportedOp(
                "fxq.backend: Dynamo split the model into several graphs; fxq calibrates graphs whose one input is "
                "the model input. Remove graph breaks (torch._dynamo.explain shows them) or use fxq.quantize"
            )
        seen.append(ops)
        if any(isinstance(v, (int, torch.SymInt)) for v in example_inputs):
            raise UnsupportedOp(
                "fxq.backend: Dynamo captured a graph with symbolic sizes; compile with "
                "torch.compile(model, backend=fxq.backend(...), dynamic=False) (each new input shape then "
                "recompiles and is quantized again)"
            )
        gm = GraphModule(gm, copy.deepcopy(gm.graph))  # Dynamo reads its graph's inputs after we return
        data = _freeze_parameters_(gm, example_inputs)
        if len(data) != 1:
            raise UnsupportedOp(
                f"fxq.backend: the captured graph takes {len(data)} data inputs; fxq calibrates graphs whose one "
                f"input is the model input. Remove graph breaks (torch._dynamo.explain) or use fxq.quantize"
            )
        gq(gm).frontend = "dynamo"
        single = _unwrap_single_output_(gm)  # Dynamo returns (out,): the passes expect the model's own output
        example = (example_inputs[data[0]],)
        qgm = quantize_graph(gm, batches, config, example)  # every stage fxq.quantize runs
        compile_fn.graphs.append(qgm)
        from torch._inductor.compile_fx import compile_fx

        run = qgm
        if int8:
            with freezing():
                run = compile_fx(to_qdq_form(qgm), list(example))
        elif inductor:
            run = compile_fx(qgm, list(example))

        def call(*args):
            out = run(*(args[i] for i in data))
            return (out,) if single else out

        return call

    compile_fn.graphs = []
    return compile_fn
