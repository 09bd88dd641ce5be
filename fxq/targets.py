"""Targets: what a device can run. Bit options, granularity, threshold form, and which ops fuse.

The backends (issue 7) and the mixed-precision ILP (issue 6) read the same description.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from fxq.errors import ConfigError
from fxq.qmath import MAX_BITS, MIN_BITS

__all__ = ["Target", "INT8", "W248A8", "target_by_name", "TARGETS"]


@dataclass(frozen=True)
class Target:
    """A device description.

    weight_bits / act_bits: the default widths; weight_bit_options: what mixed precision may pick.
    per_channel: weights per output channel (activations are always per tensor).
    pot: thresholds restricted to powers of two (fixed-point DSPs and some NPUs need this).
    fuse_activation: a linear op or add followed only by an activation shares one output quantizer.
    bias_bits: conv/linear biases are integers of this width at step s_x * s_w, as integer kernels add them
    (None: the device adds a float bias).
    """

    name: str
    weight_bits: int = 8
    act_bits: int = 8
    weight_bit_options: tuple[int, ...] = (8,)
    per_channel: bool = True
    pot: bool = False
    fuse_activation: bool = True
    bias_bits: int | None = 32
    resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        for what, b in [
            ("weight_bits", self.weight_bits),
            ("act_bits", self.act_bits),
            *(("weight_bit_options", b) for b in self.weight_bit_options),
        ]:
            if not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS:
                raise ConfigError(f"target {self.name}: {what} must be integers in [{MIN_BITS}, {MAX_BITS}], got {b!r}")
        if self.bias_bits is not None and not (isinstance(self.bias_bits, int) and 8 <= self.bias_bits <= 32):
            raise ConfigError(
                f"target {self.name}: bias_bits must be an integer in [8, 32] or None, got {self.bias_bits!r}"
            )

    def with_bits(self, weight_bits: int | None = None, act_bits: int | None = None) -> Target:
        """The same target at other default widths (checked like any target)."""
        w = self.weight_bits if weight_bits is None else weight_bits
        a = self.act_bits if act_bits is None else act_bits
        opts = tuple(sorted(set(self.weight_bit_options) | {w}))
        return replace(self, name=f"{self.name}@W{w}A{a}", weight_bits=w, act_bits=a, weight_bit_options=opts)


INT8 = Target("int8")  # generic: int8 per-channel weights, int8 per-tensor activations
W248A8 = Target("w248a8", weight_bits=4, weight_bit_options=(2, 4, 8))  # the paper's research target

TARGETS = {t.name: t for t in (INT8, W248A8)}


def target_by_name(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise ConfigError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)}") from None
