"""Plots people would rather look at than read (matplotlib, the `plot` extra; drawn off-screen)."""

from __future__ import annotations

from fxq.errors import ConfigError
from fxq.report import Report

__all__ = ["lfh_bar_chart"]


def lfh_bar_chart(report: Report, path: str) -> None:
    """One bar per interest tensor: its LFH trace (log scale), in graph order, with the standard error."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install 'fxq[plot]'") from None
    layers = [lr for lr in report.layers if lr.lfh is not None]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(layers)), 4.0))
    ax.bar(
        range(len(layers)),
        [lr.lfh for lr in layers],
        yerr=[lr.lfh_stderr for lr in layers],
        color=["tab:orange" if lr.kind in ("add", "cat") else "tab:blue" for lr in layers],
    )
    ax.set_yscale("log")
    ax.set_xticks(range(len(layers)), [lr.node for lr in layers], rotation=90, fontsize=7)
    ax.set_ylabel("LFH trace  E||J_z f(x)||²  (log)")
    ax.set_title(
        f"{report.model}: label-free Hessian per interest tensor\nblue: conv/linear/matmul output, orange: add/cat",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
