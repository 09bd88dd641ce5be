"""Exported artifacts: the file for a backend, checked against the reference first, and a JSON report beside it
(OUT.json) with the target, the integer form, the check and the bytes the weights take."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor
from torch.fx import GraphModule

from fxq.backends.check import CheckLimits, ExportCheck
from fxq.backends.lowering import max_dense_grid_bits
from fxq.errors import ConfigError, OutputError
from fxq.io.files import os_error_message, write_json_atomic
from fxq.quant.modules import QuantWeight
from fxq.targets import ISA

__all__ = ["FORMATS", "export_artifact"]

FORMATS = ("onnx", "pt2", "aoti-int8")


def _weight_bytes_onnx(path: str) -> int:
    import onnx

    model = onnx.load(path)
    return sum(
        len(t.raw_data) for t in model.graph.initializer if t.name.endswith((".codes", ".codes_int4", ".codes_nbits"))
    )


def _sub8_gain(fmt: str, storage: str, narrow: bool) -> str:
    """What sub-8-bit weights gain in this artifact."""
    if not narrow:
        return "no layer below 8 bits"
    if fmt == "onnx" and storage == "packed":
        return "memory: INT4 weights (ONNX Runtime's CPU kernels dequantize them, so no speed)"
    if fmt == "onnx":
        return "none: weights below 8 bits are held in int8 (the integer kernels run them)"
    if fmt == "aoti-int8":
        return "none: oneDNN's kernels hold weights below 8 bits in int8"
    return "none: the fake-quant program holds float weights"


def _check_target(qgm: GraphModule, isa: ISA | None) -> None:
    needs = max_dense_grid_bits(qgm)
    if isa is not None and needs > isa.dense_weight_bits:
        raise ConfigError(
            f"export: the model holds {needs}-bit weight grids in layers that sum over channels, which {isa.value}'s "
            f"integer kernels compute inexactly ({isa.form}); quantize it again with --target {isa.value}"
        )


def export_artifact(
    qgm: GraphModule,
    example: Tensor,
    out: str | os.PathLike,
    fmt: str,
    isa: ISA | None = None,
    storage: str = "packed",
    check_inputs: Tensor | None = None,
    limits: CheckLimits = CheckLimits(),
    force: bool = False,
    saved_report: dict | None = None,
) -> dict:
    """Write `qgm` to `out` in format `fmt` (onnx, pt2, aoti-int8) for a device of `isa` and its report to OUT.json;
    returns the report. The integer formats are checked on `check_inputs` before anything is written."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    _check_target(qgm, isa)
    out = os.fspath(out)
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(os_error_message(e, out)) from None
    check: ExportCheck | None = None
    if fmt == "onnx":
        from fxq.backends.onnx import WeightStorage, export_onnx

        check = export_onnx(qgm, (example,), out, WeightStorage(storage), check_inputs, limits, force, isa)
        weight_bytes = _weight_bytes_onnx(out)
    elif fmt == "aoti-int8":
        from fxq.backends.inductor import package_int8

        check = package_int8(qgm, (example,), out, check_inputs, limits, force)
        weight_bytes = sum(m.layer.weight.numel() for m in qgm.modules() if isinstance(m, QuantWeight))
    else:
        ep = torch.export.export(qgm, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},), strict=False)
        tmp = f"{out}.tmp.pt2"  # torch.export.save wants the .pt2 suffix
        try:
            torch.export.save(ep, tmp)
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        weight_bytes = sum(4 * m.layer.weight.numel() for m in qgm.modules() if isinstance(m, QuantWeight))
    widths = {n: m.spec.bits for n, m in qgm.named_modules() if isinstance(m, QuantWeight)}
    mp = (saved_report or {}).get("mixed_precision") or {}
    report = {
        "format": fmt,
        "file": Path(out).name,
        "isa": isa.value if isa else None,
        "integer_form": isa.form if isa else None,
        "weight_storage": storage if fmt == "onnx" else None,
        "file_bytes": os.path.getsize(out),
        "weight_bytes": weight_bytes,
        "ilp_weight_bytes": mp.get("weight_bytes"),
        "ilp_limits": mp.get("limits"),
        "sub8_gain": _sub8_gain(fmt, storage, any(b < 8 for b in widths.values())),
        "weight_bits": widths,
        "check": check.to_dict() if check else None,
        "check_line": check.summary() if check else None,
    }
    ilp = f"; the ILP planned {mp['weight_bytes'] / 1e6:.3f} MB" if mp.get("weight_bytes") else ""
    report["size_line"] = (
        f"{Path(out).name}: {report['file_bytes'] / 1e6:.3f} MB, weights {weight_bytes / 1e6:.3f} MB{ilp}; "
        f"sub-8-bit gain: {report['sub8_gain']}"
    )
    write_json_atomic(f"{out}.json", report)
    return report
