"""What the command line prints: one-line summaries of runs, accuracies and allocations."""

from __future__ import annotations

from fxq.io.report import Report

__all__ = ["accuracy_line", "mp_line", "selection_line", "bench_table"]


def accuracy_line(name: str, acc: dict, ref: dict | None = None) -> str:
    drop = f"  ({acc['top1'] - ref['top1']:+.2f} vs float)" if ref else ""
    return (
        f"{name:<10} top-1 {acc['top1']:6.2f}  top-5 {acc['top5']:6.2f}  on {acc['images']} images "
        f"({acc['correct1']} correct){drop}  [{acc['seconds']:.1f} s]"
    )


def mp_line(report: Report) -> str:
    m = report.mixed_precision
    counts = {b: list(m["bits"].values()).count(b) for b in m["options"]}
    return (
        f"mixed precision: {m['avg_bits']:.3f} bits/weight, {m['weight_bytes'] / 1e6:.3f} MB of weights "
        f"({', '.join(f'{n} layers at {b} bits' for b, n in counts.items() if n)}); sensitivity "
        f"{report.stage_seconds.get('Sensitivity', 0):.1f} s, ILP {m['solve_seconds'] * 1e3:.0f} ms"
        + (f"; activations {m['act_avg_bits']:.3f} bits/value" if "act_bits" in m else "")
        + (selection_line(m) if "selected" in m else "")
    )


def selection_line(m: dict) -> str:
    scores = ", ".join(f"{k} {v:.1f} %" for k, v in m["agreement"].items())
    return f"; measure {m['selected']} kept (agreement with float on {m['check_images']} calib images: {scores})"


def bench_table(rows: list[dict]) -> str:
    """fxq bench's end-to-end rows: latency (median +- interquartile range), throughput and the speed-ups."""
    lines = [
        f"{'backend':<30} {'batch':>5} {'float ms':>16} {'int8 ms':>16} {'float img/s':>11} {'int8 img/s':>10} "
        f"{'speed-up':>9} {'vs eager fp32':>14}"
    ]
    for r in rows:
        lines.append(
            f"{r['backend']:<30} {r['batch']:>5} {r['float_ms']:9.2f} ± {r['float_iqr_ms']:<5.2f}"
            f"{r['int8_ms']:9.2f} ± {r['int8_iqr_ms']:<5.2f}{r['float_images_per_s']:11.1f} "
            f"{r['int8_images_per_s']:10.1f} {r['speedup']:8.2f}x {r['eager_fp32_ms'] / r['int8_ms']:13.2f}x"
        )
    return "\n".join(lines)
