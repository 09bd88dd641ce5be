"""Checkpoints of long runs, written atomically (an interrupt leaves the previous checkpoint intact) and read back
with torch.load(weights_only=True): tensors and plain containers, never code."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from fxq.errors import ConfigError

__all__ = ["save_checkpoint", "load_checkpoint"]


def save_checkpoint(folder: str | os.PathLike, name: str, state: dict) -> Path:
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(folder: str | os.PathLike, name: str, fingerprint: dict) -> dict:
    """Load `name` from `folder`, refusing one written by a different run (model, bits or schedule)."""
    path = Path(folder) / name
    if not path.is_file():
        raise ConfigError(f"resume: no checkpoint at '{path}'; run once with checkpoint_dir set, or drop resume")
    try:  # plain tensors and containers only: a checkpoint never runs code
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise ConfigError(
            f"resume: '{path}' is not a checkpoint of plain tensors (torch.load with weights_only refused it: "
            f"{str(e).splitlines()[0][:200]}); use a fresh checkpoint_dir"
        ) from None
    if not isinstance(state, dict):
        raise ConfigError(f"resume: '{path}' is not an fxq checkpoint; use a fresh checkpoint_dir")
    if state.get("fingerprint") != fingerprint:
        diff = {k: (state.get("fingerprint", {}).get(k), v) for k, v in fingerprint.items()}
        diff = {k: v for k, v in diff.items() if v[0] != v[1]}
        raise ConfigError(
            f"resume: '{path}' was written by a different run ({diff}); use a fresh checkpoint_dir or the same settings"
        )
    return state
