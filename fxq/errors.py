"""Errors fxq raises for bad input. Every message names the cause and a fix."""

__all__ = [
    "FxqError",
    "TraceFailed",
    "UnsupportedOp",
    "ConfigError",
    "DataError",
    "ModelError",
    "GraphCheckFailed",
    "ExportMismatch",
]


class FxqError(Exception):
    """Base of every error fxq raises on purpose."""


class TraceFailed(FxqError):
    """A front-end could not turn the model into a torch.fx graph."""


class UnsupportedOp(FxqError):
    """A pass met an op it cannot handle."""


class ConfigError(FxqError, ValueError):
    """An option is out of range or inconsistent."""


class DataError(FxqError):
    """An image folder is missing, empty or holds an unreadable file."""


class ModelError(FxqError):
    """A model name is unknown or a weights file does not fit the model."""


class GraphCheckFailed(FxqError):
    """A pass's requires()/ensures() check found the graph in a state it cannot accept."""


class ExportMismatch(FxqError):
    """An exported model computes something other than the reference on the check images."""
