"""Quantized models on disk, loaded without running any code from the files.

A saved folder holds
- model.json: how to rebuild the graph (the float architecture by name, the front-end, the input's shape) and
  every quantizer's spec by node name, the target, the preprocessing;
- tensors.pt: every parameter and buffer of the quantized graph, read back with torch.load(weights_only=True),
  which refuses anything but tensors and plain containers;
- report.json: the run's report.

`load` rebuilds the float architecture (from fxq's model names, or the nn.Module the caller passes), traces it
with the same front-end, runs the pipeline's float stage, puts fake-quant modules where the saved ones were and
fills them with the saved tensors. The three files are written into a temporary folder beside the target, which
then replaces it in one rename: a reader sees the old folder or the new one, never a mix.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.fx import GraphModule

from fxq.config import PTQConfig
from fxq.data.images import Preprocess
from fxq.errors import ModelError, OutputError, first_line
from fxq.frontend.trace import Frontend, trace
from fxq.io.files import result_folder
from fxq.io.report import Report
from fxq.ir.graph import without_graph_state
from fxq.ir.meta import gq, q
from fxq.ir.ops import set_eval_
from fxq.quant.convert import rebuild_quantizers_
from fxq.quant.qmath import QSpec
from fxq.targets import ISA, Target

__all__ = [
    "Saved",
    "save",
    "load",
    "read_report",
    "saved_model_name",
    "FORMAT",
    "MODEL_FILE",
    "TENSORS_FILE",
    "REPORT_FILE",
]

FORMAT = "fxq-quantized/1"
MODEL_FILE, TENSORS_FILE, REPORT_FILE = "model.json", "tensors.pt", "report.json"
_LEGACY_PICKLE = "model.pt"


@dataclass
class Saved:
    """What `load` returns: the quantized graph, its preprocessing and report, and the model name it was built from."""

    model: GraphModule
    preprocess: Preprocess
    report: dict
    model_name: str | None


def _specs(qgm: GraphModule) -> dict[str, dict]:
    out = {}
    for n in qgm.graph.nodes:
        m = q(n)
        entry = {}
        if m.wspec is not None:
            entry["weight"] = asdict(m.wspec)
        if m.aspec is not None:
            entry["act"] = asdict(m.aspec)
        if m.bias_bits is not None:
            entry["bias_bits"] = m.bias_bits
        if m.act_range is not None:
            entry["act_range"] = list(m.act_range)
        if entry:
            out[n.name] = entry
    return out


def _constants(qgm: GraphModule) -> dict[str, Tensor]:
    """get_attr tensors that are neither parameters nor buffers (front-ends lift some constants this way)."""
    state = dict(qgm.state_dict())
    out = {}
    for n in qgm.graph.nodes:
        if n.op == "get_attr" and n.target not in state:
            value = _attr(qgm, n.target)
            if isinstance(value, Tensor):
                out[n.target] = value.detach()
    return out


def _attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _input_meta(qgm: GraphModule) -> dict:
    x = next(n for n in qgm.graph.nodes if n.op == "placeholder")
    meta = x.meta.get("tensor_meta")
    if meta is None:
        raise ModelError("save: the graph records no input shape; save a graph fxq.quantize made")
    return {"shape": list(meta.shape), "dtype": str(meta.dtype).removeprefix("torch.")}


def save(
    qgm: GraphModule,
    folder: str | os.PathLike,
    model_name: str | None = None,
    preprocess: Preprocess | None = None,
    report: Report | dict | None = None,
) -> Path:
    """Write `qgm` (what fxq.quantize returned) to `folder`, replacing what was there once the new folder is
    complete. `model_name`: a name fxq.data.models.load_model knows (without one, `load` needs the float model
    passed in)."""
    if not isinstance(qgm, GraphModule):
        raise ModelError(
            f"save: {type(qgm).__name__} is not one quantized graph (a model quantized part by part, its other code "
            f"float, is not saved yet); save each part (its sub-modules that are GraphModules), or export it"
        )
    g = gq(qgm)
    if g.frontend == "dynamo":
        raise ModelError("save: a graph from torch.compile's backend cannot be rebuilt; save fxq.quantize's result")
    if g.target is None:
        raise ModelError("save: the graph carries no target (it was not annotated); save what fxq.quantize returned")
    if any(isinstance(t, type) for t in g.leaf_modules):
        raise ModelError(
            "save: leaf_modules given as classes cannot be written down; name the modules instead, e.g. "
            "leaf_modules=('encoder.block0',)"
        )
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"save: '{folder}' is a file; give a folder to write the quantized model into")
    model_json = {
        "format": FORMAT,
        "model": model_name,
        "frontend": g.frontend or Frontend.FX.value,
        "leaf_modules": list(g.leaf_modules),
        "input": _input_meta(qgm),
        "target": {**asdict(g.target), "isa": g.target.isa.value if g.target.isa else None},
        "preprocess": asdict(preprocess) if preprocess else None,
        "nodes": _specs(qgm),
    }
    with without_graph_state(qgm):
        tensors = {"state": dict(qgm.state_dict()), "constants": _constants(qgm)}
    rep = report.to_dict() if isinstance(report, Report) else (report or {})
    buf = io.BytesIO()
    torch.save(tensors, buf)  # in memory first: a full disk then fails as an OSError on the write below
    with result_folder(folder) as tmp:
        (tmp / MODEL_FILE).write_text(json.dumps(model_json, indent=1))
        (tmp / TENSORS_FILE).write_bytes(buf.getbuffer())
        (tmp / REPORT_FILE).write_text(json.dumps({**rep, "preprocess": model_json["preprocess"]}, indent=2))
    return folder


def saved_model_name(folder: str | os.PathLike) -> str | None:
    """The model name a saved folder was built from (its model.json), without loading anything else."""
    return _read_json(Path(folder)).get("model")


def read_report(folder: str | os.PathLike) -> dict:
    """The report.json of a saved folder, or {} when there is none."""
    path = Path(folder) / REPORT_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _read_json(folder: Path) -> dict:
    path = folder / MODEL_FILE
    if not path.is_file():
        if (folder / _LEGACY_PICKLE).is_file():
            raise ModelError(
                f"'{folder}' holds a {_LEGACY_PICKLE}, a pickle an earlier fxq wrote; fxq does not load pickles "
                f"(they can run any code). Quantize the model again to write the safe format"
            )
        raise ModelError(f"'{folder}' holds no {MODEL_FILE}; give a folder written by fxq.save or `fxq quantize --out`")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"'{path}' is not valid JSON ({e}); the folder is damaged: quantize again") from None
    if meta.get("format") != FORMAT:
        raise ModelError(f"'{path}' is format {meta.get('format')!r}, this fxq reads {FORMAT!r}; quantize again")
    return meta


def _read_tensors(folder: Path) -> dict:
    path = folder / TENSORS_FILE
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"'{folder}' holds no {TENSORS_FILE}; the folder is incomplete: quantize again") from None
    except Exception as e:  # damaged bytes make the weights-only unpickler raise almost any type (IndexError, ...)
        raise ModelError(
            f"'{path}' is not a file of plain tensors (torch.load with weights_only refused it: "
            f"{first_line(e)}); fxq loads no code from files. Quantize the model again"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("state"), dict):
        raise ModelError(f"'{path}' does not hold fxq's tensors; quantize the model again")
    return data


def _float_model(meta: dict, model: nn.Module | None) -> nn.Module:
    if model is not None:
        return model
    if not meta.get("model"):
        raise ModelError("load: the folder names no model fxq can build; pass the float model: fxq.load(folder, model)")
    from fxq.data.models import load_model

    return load_model(meta["model"], random_weights=True).model  # the architecture; the tensors come from the file


def load(folder: str | os.PathLike, model: nn.Module | None = None) -> Saved:
    """Rebuild a quantized model `save` wrote. `model`: its float architecture (any weights), needed when the
    folder names no model fxq can build by name."""
    from fxq.pipeline import Stage, passes, run_passes

    folder = Path(folder)
    meta = _read_json(folder)
    data = _read_tensors(folder)
    t = dict(meta["target"])
    t["isa"] = ISA(t["isa"]) if t.get("isa") else None
    # the structure alone: no layer-input statistics (bias_correction off), the specs come from the file
    cfg = PTQConfig(
        target=Target(**t),
        frontend=meta["frontend"],
        leaf_modules=tuple(meta["leaf_modules"]),
        bias_correction=False,
        progress=False,
    )
    shape, dtype = meta["input"]["shape"], getattr(torch, meta["input"]["dtype"])
    example = (torch.zeros([max(2, shape[0]), *shape[1:]], dtype=dtype),)
    float_model = _float_model(meta, model).eval()
    gm = trace(float_model, example, cfg.frontend, cfg.leaf_modules)
    gm = run_passes(gm, passes(cfg, None, example, (Stage.FLOAT, Stage.OBSERVE)))
    saved_nodes = meta["nodes"]
    for n in gm.graph.nodes:
        entry = saved_nodes.get(n.name, {})
        m = q(n)
        m.wspec = QSpec(**entry["weight"]) if "weight" in entry else None
        m.aspec = QSpec(**entry["act"]) if "act" in entry else None
        m.bias_bits = entry.get("bias_bits")
        m.act_range = tuple(entry["act_range"]) if "act_range" in entry else None
    rebuild_quantizers_(gm)
    _fill_(gm, data, folder)
    p = meta.get("preprocess")
    pre = Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in p.items()}) if p else Preprocess()
    return Saved(set_eval_(gm), pre, read_report(folder), meta.get("model"))


def _fill_(gm: GraphModule, data: dict, folder: Path) -> None:
    """Load the saved tensors into the rebuilt graph, giving optional buffers and biases their place first."""
    state: dict[str, Tensor] = data["state"]
    for key, value in state.items():
        owner_name, _, attr = key.rpartition(".")
        try:
            owner = gm.get_submodule(owner_name)
        except AttributeError:
            continue  # reported by load_state_dict below
        if attr in owner._buffers and owner._buffers[attr] is None:
            owner._buffers[attr] = torch.empty_like(value)
        elif attr in owner._parameters and owner._parameters[attr] is None:
            owner._parameters[attr] = nn.Parameter(torch.empty_like(value), requires_grad=False)
    try:
        gm.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(
            f"'{folder}': the saved tensors do not fit the rebuilt graph ({first_line(e, 300)}); was it "
            f"saved by another fxq or torch version, or from another model? Quantize it again"
        ) from None
    for target, value in data.get("constants", {}).items():
        owner_name, _, attr = target.rpartition(".")
        setattr(gm.get_submodule(owner_name), attr, value)
    gm.recompile()
