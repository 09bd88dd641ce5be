"""Plots people would rather look at than read (matplotlib, the `plot` extra; drawn off-screen)."""

from __future__ import annotations

from fxq.errors import ConfigError
from fxq.io.report import Report

__all__ = ["lfh_bar_chart", "pareto_plot"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install 'fxq[plot]'") from None
    return plt


def lfh_bar_chart(report: Report, path: str) -> None:
    """One bar per interest tensor: its LFH trace (log scale), in graph order, with the standard error."""
    plt = _pyplot()
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


def pareto_plot(rows: list[dict], path: str, title: str) -> None:
    """Top-1 against weight memory: the mixed-precision sweep as a line, uniform widths as labelled points.

    rows: dicts with kind ("mixed" or "uniform"), weight_mb, top1 and label.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    mixed = sorted((r for r in rows if r["kind"] == "mixed"), key=lambda r: r["weight_mb"])
    uniform = [r for r in rows if r["kind"] == "uniform"]
    if mixed:
        ax.plot([r["weight_mb"] for r in mixed], [r["top1"] for r in mixed], "o-", label="mixed precision (ILP)")
    if uniform:
        ax.plot([r["weight_mb"] for r in uniform], [r["top1"] for r in uniform], "s", color="tab:gray", label="uniform")
        for r in uniform:
            ax.annotate(
                r["label"], (r["weight_mb"], r["top1"]), textcoords="offset points", xytext=(4, -10), fontsize=7
            )
    ax.set_xlabel("quantized weight memory (MB)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def roofline_plot(report: dict, path: str) -> None:
    """Achieved throughput of each op against its arithmetic intensity, one marker per backend and side, under the
    measured roofs (fp32 and int8 compute, memory bandwidth). `report`: fxq.backends.per_op's JSON."""
    plt = _pyplot()
    peaks = report["peaks"]
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    ops = report["ops"]
    keys = sorted({k for op in ops for k in op["gops"]})
    markers = {"float": "o", "quantized": "^"}
    for i, key in enumerate(keys):
        backend, side = key.split(":")
        quantized = side == "quantized" and backend != "reference"
        xs = [2 * op["macs"] / (op["bytes_quantized"] if quantized else op["bytes_float"]) for op in ops]
        ys = [op["gops"][key] for op in ops]
        ax.scatter(xs, ys, s=14, marker=markers[side], color=f"C{i}", alpha=0.75, label=key)
    lo = min(2 * op["macs"] / op["bytes_float"] for op in ops) / 2
    hi = max(2 * op["macs"] / op["bytes_quantized"] for op in ops) * 2
    grid = [lo * (hi / lo) ** (j / 200) for j in range(201)]
    for roof, name, style in ((peaks["fp32_gflops"], "fp32 GEMM", "-"), (peaks["int8_gops"], "int8 GEMM", "--")):
        if roof:
            ax.plot(grid, [min(roof, peaks["bandwidth_gbs"] * x) for x in grid], style, color="k", lw=1, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (ops / byte of minimum traffic)")
    ax.set_ylabel("achieved GOP/s")
    title = f"{report['model']} per op, batch {report['batch']}: {report['cpu']}, {report['threads']} threads"
    ax.set_title(f"{title}\nroofs: {peaks['bandwidth_gbs']:.1f} GB/s, int8 by {peaks['int8_kernel']}", fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
