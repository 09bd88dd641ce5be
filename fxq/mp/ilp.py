"""The bit-allocation ILP of EPTQ's mixed precision, solved with HiGHS (highspy).

Binary x[l, k]: layer l takes the k-th bit-width. One choice per layer; minimise the summed sensitivity
subject to resource budgets (weight memory, BOPs, latency), each a linear function of the choices. It is a
multiple-choice knapsack: HiGHS solves 1000 layers x 3 widths in well under a second.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from fxq.errors import ConfigError

__all__ = ["Budget", "Allocation", "solve_allocation"]


@dataclass(frozen=True)
class Budget:
    """One resource constraint: sum over layers of usage[l, k] for the chosen k <= limit."""

    name: str  # e.g. "weight memory (bytes)"
    usage: np.ndarray  # (L, K)
    limit: float


@dataclass(frozen=True)
class Allocation:
    choice: list[int]  # per layer, the index of its chosen option
    objective: float
    usage: dict[str, float]  # per budget, what the choice uses
    seconds: float


def _check(cost: np.ndarray, budgets: list[Budget], allowed: np.ndarray) -> None:
    if cost.ndim != 2 or cost.shape[0] == 0 or cost.shape[1] == 0:
        raise ConfigError(f"bit allocation: need a (layers, options) cost table, got shape {cost.shape}")
    if allowed.shape != cost.shape or not allowed.any(axis=1).all():
        raise ConfigError("bit allocation: every layer needs at least one allowed option")
    if not np.isfinite(cost[allowed]).all():
        raise ConfigError("bit allocation: the sensitivities hold NaN/inf; check the model and the images")
    for b in budgets:
        if b.usage.shape != cost.shape:
            raise ConfigError(f"bit allocation: {b.name} usage has shape {b.usage.shape}, expected {cost.shape}")
        smallest = float(np.where(allowed, b.usage, np.inf).min(1).sum())
        if smallest > b.limit * (1 + 1e-9):
            raise ConfigError(
                f"bit allocation: the {b.name} budget {b.limit:.6g} is infeasible; the smallest choice needs "
                f"{smallest:.6g} (every layer at its cheapest width). Raise the budget to at least that."
            )


def _highs():
    """A silent HiGHS instance (its first construction in a process prints a banner on the C stdout)."""
    import highspy

    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        h = highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
    h.setOptionValue("output_flag", False)
    return h


def solve_allocation(
    cost: np.ndarray, budgets: list[Budget], time_limit: float = 60.0, allowed: np.ndarray | None = None
) -> Allocation:
    """Minimise sum cost[l, x_l] subject to every budget; exact up to HiGHS's default MIP gap (1e-4).

    `allowed` (layers, options) masks options a layer cannot take (rows with fewer choices, e.g. activations
    whose widths differ from the weights'); their cost and usage are ignored."""
    import highspy

    allowed = np.ones(np.shape(cost), bool) if allowed is None else np.asarray(allowed, bool)
    cost = np.asarray(cost, dtype=np.float64)
    _check(cost, budgets, allowed)
    cost = np.where(allowed, cost, 0.0)
    budgets = [Budget(b.name, np.where(allowed, b.usage, 0.0), b.limit) for b in budgets]
    t0 = time.perf_counter()
    n_layers, n_opts = cost.shape
    n = n_layers * n_opts
    h = _highs()
    h.setOptionValue("time_limit", float(time_limit))
    h.addCols(
        n,
        cost.ravel(),
        np.zeros(n),
        allowed.ravel().astype(float),
        0,
        np.array([], np.int32),
        np.array([], np.int32),
        np.array([]),
    )
    h.changeColsIntegrality(n, np.arange(n, dtype=np.int32), np.full(n, highspy.HighsVarType.kInteger))
    # one option per layer: rows of n_opts ones
    starts = np.arange(0, n, n_opts, dtype=np.int32)
    h.addRows(n_layers, np.ones(n_layers), np.ones(n_layers), n, starts, np.arange(n, dtype=np.int32), np.ones(n))
    for b in budgets:
        h.addRow(-highspy.kHighsInf, float(b.limit), n, np.arange(n, dtype=np.int32), b.usage.ravel().astype(float))
    h.run()
    status = h.getModelStatus()
    if status != highspy.HighsModelStatus.kOptimal:
        raise ConfigError(
            f"bit allocation: HiGHS ended with status {h.modelStatusToString(status)}; loosen the budgets"
        )
    x = np.asarray(h.getSolution().col_value).reshape(n_layers, n_opts)
    choice = [int(i) for i in x.argmax(1)]
    rows = np.arange(n_layers)
    return Allocation(
        choice=choice,
        objective=float(cost[rows, choice].sum()),
        usage={b.name: float(b.usage[rows, choice].sum()) for b in budgets},
        seconds=time.perf_counter() - t0,
    )
