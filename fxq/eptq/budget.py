"""A wall-clock budget for a whole quantization run, and the rounding schedule planned to end inside it.

The clock (fxq.ir.meta.Deadline on the graph) starts when the run traces the model; the CLI counts image loading
too. The LFH may use a share of the budget before it stops adding probes beyond its minimum; the rounding
optimization times its first steps, then sets its iteration count so that the steps, the hardening and the keep-best
check end before the deadline; it plans again on each doubled window of steps while it is in the first REPLAN_SHARE
of its length, from the latest window's pace (a machine's first steps can run several times slower than the rest,
and a plan from them alone would end far inside the budget). The iteration count the config gives stays an upper
bound, so a budget never lengthens a schedule. A rounding that starts with time left takes at least its PLAN_AFTER
timing steps; one that starts past the deadline takes none (RTN).
"""

from __future__ import annotations

import math
import re

from fxq.errors import ConfigError

__all__ = ["parse_duration", "planned_iterations", "LFH_SHARE", "PLAN_AFTER", "REPLAN_SHARE"]

LFH_SHARE = 0.1  # of the budget, after which the LFH stops at its minimum probe count
PLAN_AFTER = 4  # rounding steps timed before the schedule is planned (the first one, a warm-up, apart)
REPLAN_SHARE = 0.1  # of the planned length, inside which the plan is made again (within the default 20 % warm-up,
# so the temperature schedule has not begun when its length moves)


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
