"""Run configuration: one small frozen dataclass, checked at construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from fxq.errors import ConfigError
from fxq.frontend import Frontend
from fxq.qmath import ActThreshold
from fxq.targets import INT8, Target

__all__ = ["Method", "ActThreshold", "PTQConfig", "Probe", "LFHConfig"]


def _coerce_enums_(cfg, **fields: type[Enum]) -> None:
    """Accept an enum's value string for each field of a frozen config (CLI and JSON give strings)."""
    for name, enum in fields.items():
        value = getattr(cfg, name)
        if not isinstance(value, enum):
            try:
                object.__setattr__(cfg, name, enum(value))
            except ValueError:
                raise ConfigError(f"{name} must be one of {[e.value for e in enum]}, got {value!r}") from None


class Method(Enum):
    RTN = "rtn"  # round to nearest on error-minimising thresholds


class Probe(Enum):
    GAUSSIAN = "gaussian"  # v ~ N(0, I)
    RADEMACHER = "rademacher"  # v in {-1, +1}: lower variance for the same probe count


@dataclass(frozen=True)
class LFHConfig:
    """Label-Free Hessian estimation (METHOD.md section 1; MCT: min 10, max 100 probes, tolerance 1e-3)."""

    min_probes: int = 10
    max_probes: int = 100
    rel_tol: float = 1e-3  # stop when no trace's running mean moves by more than this, relatively
    probe: Probe = Probe.GAUSSIAN
    images: int = 32  # representative images (MCT's default for its Hessian: 32 on GPU, 16 in v1)
    batch_size: int = 32
    probes_per_pass: int = 1  # probes batched into one backward (replicated batch); trades memory for speed
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.min_probes <= self.max_probes:
            raise ConfigError(f"need 0 < min_probes <= max_probes, got {self.min_probes}, {self.max_probes}")
        if not self.rel_tol > 0:
            raise ConfigError(f"rel_tol must be > 0, got {self.rel_tol}")
        if self.images < 1 or self.batch_size < 1 or self.probes_per_pass < 1:
            raise ConfigError(
                f"images, batch_size and probes_per_pass must be >= 1, got {self.images}, {self.batch_size}, "
                f"{self.probes_per_pass}"
            )
        _coerce_enums_(self, probe=Probe)


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
        _coerce_enums_(self, method=Method, act_threshold=ActThreshold, frontend=Frontend)
        if not isinstance(self.target, Target):
            raise ConfigError(f"target must be an fxq.targets.Target, got {type(self.target).__name__}")
        if self.weight_grid < 2:
            raise ConfigError(f"weight_grid must be >= 2, got {self.weight_grid}")
