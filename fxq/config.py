"""Run configuration: one small frozen dataclass, checked at construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from fxq.errors import ConfigError
from fxq.frontend import Frontend
from fxq.qmath import ActThreshold
from fxq.targets import INT8, Target

__all__ = ["Method", "ActThreshold", "PTQConfig"]


class Method(Enum):
    RTN = "rtn"  # round to nearest on error-minimising thresholds


@dataclass(frozen=True)
class PTQConfig:
    """What to quantize to and how.

    Example:
        PTQConfig(target=fxq.targets.INT8.with_bits(weight_bits=4), method=Method.RTN)
    """

    target: Target = INT8
    method: Method = Method.RTN
    act_threshold: ActThreshold = ActThreshold.MSE
    weight_grid: int = 64  # threshold candidates per weight channel
    bias_correction: bool = True  # cancel the mean output shift of weight rounding (MCT's default too)
    frontend: Frontend = Frontend.FX
    leaf_modules: tuple = field(default_factory=tuple)
    progress: bool = True

    def __post_init__(self):
        for name, enum in (("method", Method), ("act_threshold", ActThreshold), ("frontend", Frontend)):
            value = getattr(self, name)
            if not isinstance(value, enum):
                try:
                    object.__setattr__(self, name, enum(value))
                except ValueError:
                    raise ConfigError(f"{name} must be one of {[e.value for e in enum]}, got {value!r}") from None
        if not isinstance(self.target, Target):
            raise ConfigError(f"target must be an fxq.targets.Target, got {type(self.target).__name__}")
        if self.weight_grid < 2:
            raise ConfigError(f"weight_grid must be >= 2, got {self.weight_grid}")
