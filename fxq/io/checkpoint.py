"""Checkpoints of long runs, written atomically (an interrupt or a full disk leaves the previous checkpoint intact)
and read back with torch.load(weights_only=True): tensors and plain containers, never code.

Each checkpoint carries the fingerprint of the run that wrote it: a flat dict of named fields (hashes of the
model's weights and of the calibration images, every setting that changes what the run computes). Resuming
compares it field by field and refuses a checkpoint that differs, naming the fields.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch

from fxq.errors import CheckpointError, first_line
from fxq.io.files import write_atomic

__all__ = [
    "save_checkpoint",
    "read_checkpoint",
    "load_checkpoint",
    "check_fingerprint",
    "tensor_digest",
    "fingerprint_mismatch",
    "Measured",
]

_MEASURED_RTOL = 1e-4  # float sums in another order (another number of ranks) move a measured value far less


class Measured(list):
    """A fingerprint field of measured floats (quantizer steps, LFH weights): two runs agree when every value does
    to a relative 1e-4, not bit for bit. Saved as a plain list."""


def tensor_digest(tensors) -> str:
    """A short content hash of tensors (dtype, shape and bytes, in order): equal tensors, equal digest."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def save_checkpoint(folder: str | os.PathLike, name: str, state: dict) -> Path:
    if isinstance(state.get("fingerprint"), dict):  # plain containers only: a load runs no code of ours either
        state = {
            **state,
            "fingerprint": {k: list(v) if isinstance(v, Measured) else v for k, v in state["fingerprint"].items()},
        }
    buf = io.BytesIO()
    torch.save(state, buf)  # serialised in memory first: a full disk then fails as an OSError on the write
    return write_atomic(Path(folder) / name, lambda tmp: tmp.write_bytes(buf.getbuffer()))


def read_checkpoint(folder: str | os.PathLike, name: str) -> dict:
    """The checkpoint `name` in `folder`, refused by name when missing, damaged or not an fxq checkpoint."""
    path = Path(folder) / name
    if not path.is_file():
        raise CheckpointError(
            f"resume: no checkpoint at '{path}'; run once with checkpoint_dir (--checkpoint-dir) set, or drop resume"
        )
    try:  # plain tensors and containers only: a checkpoint never runs code
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # damaged bytes make the weights-only unpickler raise almost any type (IndexError, ...)
        raise CheckpointError(
            f"resume: '{path}' is damaged or not a checkpoint of plain tensors ({first_line(e)}); delete it and "
            f"run again without resume"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("fingerprint"), dict) or "step" not in state:
        raise CheckpointError(f"resume: '{path}' is not an fxq checkpoint; delete it and run again without resume")
    return state


def fingerprint_mismatch(saved: dict, current: dict) -> dict[str, tuple]:
    """{field: (checkpoint's value, this run's value)} for every field that differs (a Measured field: by more
    than its tolerance)."""
    keys = list(current) + [k for k in saved if k not in current]
    return {k: (saved.get(k), current.get(k)) for k in keys if not _same(saved.get(k), current.get(k))}


def _same(saved, current) -> bool:
    if isinstance(current, Measured) and isinstance(saved, list) and len(saved) == len(current):
        a, b = torch.tensor(saved, dtype=torch.float64), torch.tensor(current, dtype=torch.float64)
        return bool(((a - b).abs() <= _MEASURED_RTOL * torch.maximum(a.abs(), b.abs())).all())
    return saved == current


def _show(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def check_fingerprint(path: str | os.PathLike, saved: dict, current: dict) -> None:
    """Refuse a checkpoint at `path` whose fingerprint `saved` differs from `current`, naming each field."""
    diff = fingerprint_mismatch(saved, current)
    if diff:
        fields = "; ".join(f"{k}: checkpoint {_show(a)}, this run {_show(b)}" for k, (a, b) in diff.items())
        raise CheckpointError(
            f"resume: '{path}' was written by a different run ({fields}); resume with the same "
            f"model, images and settings, or use a fresh checkpoint_dir"
        )


def load_checkpoint(folder: str | os.PathLike, name: str, fingerprint: dict) -> dict:
    """Load `name` from `folder`, refusing one written by a run that differs from this one in any field."""
    state = read_checkpoint(folder, name)
    check_fingerprint(Path(folder) / name, state["fingerprint"], fingerprint)
    return state
