"""Which u8/s8 integer forms ONNX Runtime's convolutions compute exactly on this CPU, and how fast.

    python bench/int8_forms.py

One QLinearConv (64 channels, 3x3, then depthwise and 1x1 variants) fed extreme codes, against exact integer
arithmetic in float64: the largest difference in output steps and the share of outputs off by more than one,
for u8 x s8 with full 8-bit codes, 7-bit weight codes, 7-bit activations, u8 x u8 and s8 x s8. Then the time of
a 256 -> 256 3x3 convolution on 28x28 in each form. The CPU and fxq's ISA class head the output.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from fxq.targets import cpu_description

FORMS = {  # name: (activation dtype, range, zero point, weight dtype, range, zero point)
    "u8 x s8, 8-bit codes": (np.uint8, (0, 255), 0, np.int8, (-128, 127), 0),
    "u8 x s8, 7-bit weight codes": (np.uint8, (0, 255), 0, np.int8, (-64, 63), 0),
    "u7 x s8": (np.uint8, (0, 127), 0, np.int8, (-128, 127), 0),
    "u8 x u8": (np.uint8, (0, 255), 0, np.uint8, (0, 255), 128),
    "s8 x s8": (np.int8, (-128, 127), 0, np.int8, (-128, 127), 0),
}


def _session(w: np.ndarray, x_dtype, x_zero: int, w_zero: int, k: int, group: int, y_scale: float):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    types = {np.uint8: TensorProto.UINT8, np.int8: TensorProto.INT8}
    cout = w.shape[0]
    y_zero = 128 if x_dtype is np.uint8 else 0
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.array(1.0, np.float32), "xs"),
        numpy_helper.from_array(np.array(x_zero, x_dtype), "xz"),
        numpy_helper.from_array(np.ones(cout, np.float32), "ws"),
        numpy_helper.from_array(np.full(cout, w_zero, w.dtype), "wz"),
        numpy_helper.from_array(np.array(y_scale, np.float32), "ys"),
        numpy_helper.from_array(np.array(y_zero, x_dtype), "yz"),
    ]
    node = helper.make_node(
        "QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], pads=[k // 2] * 4, group=group
    )
    graph = helper.make_graph(
        [node],
        "conv",
        [helper.make_tensor_value_info("x", types[x_dtype], None)],
        [helper.make_tensor_value_info("y", types[x_dtype], None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]), y_zero


def exactness(form, k: int, group: int, rng) -> tuple[float, float]:
    x_dtype, x_range, x_zero, w_dtype, w_range, w_zero = form
    cin = cout = 64
    x = rng.integers(x_range[0], x_range[1] + 1, (2, cin, 12, 12)).astype(x_dtype)
    w = rng.integers(w_range[0], w_range[1] + 1, (cout, cin // group, k, k)).astype(w_dtype)
    w[:8], w[8:16], x[0] = w_range[1], w_range[0], x_range[1]  # neighbouring extremes: the worst pairs
    exact = torch.nn.functional.conv2d(
        torch.tensor(x.astype(np.float64) - x_zero),
        torch.tensor(w.astype(np.float64) - w_zero),
        padding=k // 2,
        groups=group,
    ).numpy()
    y_scale = float(np.abs(exact).max() / 120)
    sess, y_zero = _session(w, x_dtype, x_zero, w_zero, k, group, y_scale)
    got = sess.run(None, {"x": x})[0].astype(np.float64) - y_zero
    want = np.clip(np.round(exact / y_scale), -128, 127)
    return float(np.abs(got - want).max()), float((np.abs(got - want) > 1).mean())


def speed(form, batch: int, rng, iters: int = 20) -> float:
    x_dtype, _, x_zero, w_dtype, _, w_zero = form
    x = rng.integers(0, 100, (batch, 256, 28, 28)).astype(x_dtype)
    w = (rng.integers(-60, 60, (256, 256, 3, 3)) + w_zero).astype(w_dtype)
    sess, _ = _session(w, x_dtype, x_zero, w_zero, 3, 1, 1.0)
    sess.run(None, {"x": x})
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"CPU {cpu_description()}, {torch.get_num_threads()} threads")
    print(f"{'form':<30} {'3x3 max steps':>13} {'off >1':>7} {'1x1':>5} {'depthwise':>9} {'ms b1':>7} {'ms b8':>7}")
    for name, form in FORMS.items():
        dense, share = exactness(form, 3, 1, rng)
        pointwise, _ = exactness(form, 1, 1, rng)
        depthwise, _ = exactness(form, 3, 64, rng)
        b1, b8 = speed(form, 1, rng), speed(form, 8, rng)
        print(f"{name:<30} {dense:13.0f} {100 * share:6.1f}% {pointwise:5.0f} {depthwise:9.0f} {b1:7.2f} {b8:7.2f}")


if __name__ == "__main__":
    main()
