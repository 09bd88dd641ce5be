"""A wall-clock budget for a whole quantization run, and the rounding schedule planned to end inside it.

The clock (fxq.ir.meta.Deadline on the graph) starts when the run traces the model; the CLI counts image loading
too. The LFH may use a share of the budget before it stops adding probes beyond its minimum; the rounding
optimization times its first steps, then sets its iteration count so that the steps, the hardening and the keep-best
check end before the deadline; it plans again after each window of steps, from that window's pace, the windows
doubling up to REPLAN_SHARE of the planned length and going on to the end (a machine's first steps can run several
times slower than the rest, and a shared machine's pace moves with its neighbours': a plan from one slow window
would end far inside the budget). A plan that moves after the warm-up moves the temperature schedule with it. The
iteration count the config gives stays an upper bound, so a budget never lengthens a schedule. A rounding that
starts with time left takes at least its PLAN_AFTER timing steps; one that starts past the deadline takes none
(RTN).
"""

from __future__ import annotations

import math
import re

from fxq.errors import ConfigError

__all__ = ["parse_duration", "planned_iterations", "LFH_SHARE", "PLAN_AFTER", "REPLAN_SHARE"]

LFH_SHARE = 0.1  # of the budget, after which the LFH stops at its minimum probe count
PLAN_AFTER = 4  # rounding steps timed before the schedule is planned (the first one, a warm-up, apart)
REPLAN_SHARE = 0.05  # of the planned length: the longest window of steps timed for a plan


def planned_iterations(done: int, limit: int, seconds_left: float, seconds_per_step: float, reserve: float) -> int:
    """The iteration count that ends `reserve` seconds before the deadline: `done` steps taken, each further one
    costing `seconds_per_step`, never more than `limit` nor fewer than `done`."""
    spare = seconds_left - reserve
    more = math.floor(spare / seconds_per_step) if spare > 0 and seconds_per_step > 0 else 0
    return max(done, min(limit, done + more))


_UNITS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """Seconds in '900', '900s', '15m', '1.5h' or '1h30m'."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(h|min|m|s|)", text.strip().lower())
    if not parts or "".join(n + u for n, u in parts) != re.sub(r"\s+", "", text.strip().lower()):
        raise ConfigError(f"cannot read the duration {text!r}: write e.g. 900s, 15m, 1.5h or 1h30m")
    seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not seconds > 0:
        raise ConfigError(f"a time budget must be > 0, got {text!r}")
    return seconds
