"""What this machine can do, measured in a few seconds: fp32 and int8 GEMM throughput and memory bandwidth.

The per-op table divides each op's achieved throughput by these roofs. They are measured, not read off a
spec sheet: a GEMM large enough to run at the library's best (torch.mm for fp32; ONNX Runtime's MatMulInteger for
int8 with int32 accumulation) and a copy of a buffer far larger than the caches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from fxq.backends.latency import time_call

__all__ = ["Peaks", "measure_peaks"]


@dataclass(frozen=True)
class Peaks:
    fp32_gflops: float  # 2 * M * N * K / s: the faster of torch.mm and ONNX Runtime's MatMul
    int8_gops: float  # the same for an 8-bit GEMM into int32: the faster of `int8_kernel`s tried
    int8_kernel: str
    bandwidth_gbs: float  # bytes read + written per second by a large copy
    gemm_size: int
    copy_mib: int
    threads: int

    def to_dict(self) -> dict:
        return asdict(self)


def measure_peaks(gemm_size: int = 1024, copy_mib: int = 256, iters: int = 10) -> Peaks:
    """The machine's roofs at torch's current thread count (a few seconds on two cores). Each compute roof is the
    best of the GEMM libraries at hand, so that no op of a backend can beat its own roof by using a faster one."""
    n = gemm_size
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    flops = 2 * n**3
    fp32 = flops / time_call(lambda: torch.mm(a, b), iters) / 1e9
    au = torch.randint(0, 128, (n, n), dtype=torch.uint8, generator=g)  # 7-bit activations: exact on any x86
    bi = torch.randint(-64, 64, (n, n), dtype=torch.int8, generator=g)
    try:
        fp32 = max(fp32, flops / _ort_gemm("MatMul", a, b, iters) / 1e9)
        int8, int8_kernel = flops / _ort_gemm("MatMulInteger", au, bi, iters) / 1e9, "onnxruntime MatMulInteger u8s8"
    except ImportError:  # torch's CPU int8 GEMM is a plain loop on many builds: a low roof, and said so
        int8 = flops / time_call(lambda: torch._int_mm(au.to(torch.int8), bi), 2, 1) / 1e9
        int8_kernel = "torch._int_mm"
    src = torch.empty(copy_mib * 2**20 // 4)
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * 4 / time_call(lambda: dst.copy_(src), iters) / 1e9
    return Peaks(fp32, int8, int8_kernel, bw, n, copy_mib, torch.get_num_threads())


def _ort_gemm(op: str, a: torch.Tensor, b: torch.Tensor, iters: int) -> float:
    """Median seconds of one ONNX Runtime `op` (MatMul, MatMulInteger) of a fed `a` and a constant `b`."""
    from onnx import TensorProto, helper

    from fxq.backends.onnx import ort_session

    types = {torch.float32: TensorProto.FLOAT, torch.uint8: TensorProto.UINT8, torch.int8: TensorProto.INT8}
    out = TensorProto.FLOAT if a.dtype == torch.float32 else TensorProto.INT32
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["y"])],
        "gemm",
        [helper.make_tensor_value_info("a", types[a.dtype], list(a.shape))],
        [helper.make_tensor_value_info("y", out, [a.shape[0], b.shape[1]])],
        [helper.make_tensor("b", types[b.dtype], list(b.shape), b.numpy().tobytes(), raw=True)],
    )
    session = ort_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString())
    feed = {"a": a.numpy()}
    return time_call(lambda: session.run(None, feed), iters)
