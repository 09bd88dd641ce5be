"""Activation steps learned during the rounding optimization (LSQ's gradient, arXiv 1902.08153).

Calibration fits each activation quantizer's threshold to its own tensor (MSE); at 4-bit activations the best
step for the network's output is not the one that fits each tensor, and the weights' rounding changes what reaches
each quantizer. Here every activation step trains beside V as s0 * exp(u), u one flat tensor (zero at first): the
log factor makes one learning rate fit steps of any size, and the optimizer's per-element scaling makes LSQ's
gradient factor moot. Quantizers whose input the steps do not reach (in a frozen prefix) get no gradient and stay.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fxq.quant.modules import ActQuant

__all__ = ["ActSteps"]


class ActSteps:
    """Trainable steps of `quantizers`: `refresh()` before each forward gives each its live step, `harden_()`
    writes the learned steps into them, `use_start_()` puts calibration's back, `close()` ends training either
    way."""

    def __init__(self, quantizers: Sequence[ActQuant]):
        self.quantizers = list(quantizers)
        steps = [q.scale.detach().float().reshape(1) for q in self.quantizers]
        self.start = torch.cat(steps) if steps else torch.zeros(0)  # a graph may keep every activation float
        self.log_factor = torch.zeros_like(self.start, requires_grad=True)

    def refresh(self) -> None:
        live = self.start * self.log_factor.exp()
        for i, q in enumerate(self.quantizers):
            q.live_scale = live[i : i + 1]

    @torch.no_grad()
    def steps(self) -> Tensor:
        """The learned steps, as they stand."""
        return self.start * self.log_factor.exp()

    @torch.no_grad()
    def harden_(self) -> None:
        self._write_(self.steps())

    @torch.no_grad()
    def use_start_(self) -> None:
        self._write_(self.start)

    def _write_(self, steps: Tensor) -> None:
        for q, s in zip(self.quantizers, steps):
            q.scale.copy_(s.to(q.scale.dtype))
            q.live_scale = None

    def close(self) -> None:
        for q in self.quantizers:
            q.live_scale = None

    def state_dict(self) -> dict[str, Tensor]:
        return {"log_factor": self.log_factor.detach().clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            self.log_factor.copy_(state["log_factor"])

    def summary(self) -> dict:
        """How far the steps moved from calibration's: the factor's range and how many moved by over 1 %."""
        factor = self.log_factor.detach().exp()
        if factor.numel() == 0:
            return {"act_steps_trained": 0}
        return {
            "act_steps_trained": len(self.quantizers),
            "act_step_factor_min": float(factor.min()),
            "act_step_factor_max": float(factor.max()),
            "act_steps_moved_1pct": int(((factor - 1).abs() > 0.01).sum()),
        }
