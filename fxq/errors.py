"""Errors fxq raises for bad input, bad files, unwritable outputs and refused resumes. Every message names the
cause, where it is, and a fix; the command line prints it as one line and exits 2."""

from __future__ import annotations

__all__ = [
    "FxqError",
    "TraceFailed",
    "UnsupportedOp",
    "ConfigError",
    "DataError",
    "ModelError",
    "GraphCheckFailed",
    "ExportMismatch",
    "OutputError",
    "CheckpointError",
    "RankLost",
    "first_line",
]


class FxqError(Exception):
    """Base of every error fxq raises on purpose."""


class TraceFailed(FxqError):
    """A front-end could not turn the model into a torch.fx graph."""

    cause: str = ""  # what failed and where, without the remedies
    leaf_remedy: str | None = None  # symbolic tracing: how to keep the failing module whole, where that helps


class UnsupportedOp(FxqError):
    """A pass met an op it cannot handle."""


class ConfigError(FxqError, ValueError):
    """An option is out of range or inconsistent."""


class DataError(FxqError):
    """An image folder or set is missing, empty, or holds an unreadable file or label."""


class ModelError(FxqError):
    """A model name is unknown, or a weights file or saved folder cannot be read or does not fit the model."""


class GraphCheckFailed(FxqError):
    """A pass's requires()/ensures() check found the graph in a state it cannot accept."""


class ExportMismatch(FxqError):
    """An exported model computes something other than the reference on the check images."""


class OutputError(FxqError):
    """An output path cannot be written: it is a file, a non-empty folder, read-only, or the disk is full."""


class CheckpointError(FxqError):
    """A checkpoint is missing, damaged, or was written by a run that differs from this one."""


class RankLost(FxqError):
    """A data-parallel run lost one of its ranks (crashed, killed, unreachable) in the middle of a collective."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its class name when the message is empty), for one-line errors."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]
