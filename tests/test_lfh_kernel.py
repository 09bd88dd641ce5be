"""The fused LFH update: the PyTorch reference against the two-step path, the reducer's flushing, the loader's
fallback, an nvcc compile of the CUDA source, and (with a GPU) the kernel against the reference."""

import copy
import shutil
import subprocess
import sysconfig
import time
import warnings

import pytest
import torch

import fxq
from fxq.ir.meta import gq, q
from fxq.ir.taps import interest_nodes
from fxq.kernels import lfh_cuda
from fxq.kernels.lfh import LFHReducer
from fxq.kernels.lfh_reduce import (
    RunningStats,
    fused_update_reference_,
    sumsq_per_sample,
    welford_update_,
)
from tests.conftest import seeded

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# per-sample shapes and dtypes of one backward: tiny, odd, one-dim, empty, and larger than one block's chunk
SHAPES = [((3, 5, 5), torch.float32), ((7,), torch.float16), ((2, 3), torch.bfloat16), ((), torch.float32)]
SHAPES += [((4100,), torch.float32), ((3, 2, 700), torch.float16), ((0,), torch.float32), ((9, 9), torch.float64)]


def grads_of(batch: int, seed: int, device="cpu", shapes=SHAPES) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *s, generator=g) * (i + 1)).to(device, dt) for i, (s, dt) in enumerate(shapes)]


def state(n: int, device="cpu") -> tuple[RunningStats, torch.Tensor, torch.Tensor]:
    return (
        RunningStats.zeros(n, device),
        torch.full((n,), float("inf"), dtype=torch.float64, device=device),
        torch.zeros(n, dtype=torch.bool, device=device),
    )


def assert_same(a: RunningStats, b: RunningStats, rtol=1e-12, atol=0.0):
    for x, y in [(a.count, b.count), (a.mean, b.mean), (a.m2, b.m2)]:
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def two_step_(stats: RunningStats, grads: list[torch.Tensor], min_count: int, rel_tol: float):
    """Today's path: sumsq_per_sample in the hooks, welford_update_ after the backward, then the move."""
    prev = stats.mean.clone()
    welford_update_(stats, torch.stack([sumsq_per_sample(g) for g in grads]))
    moved = (stats.mean - prev).abs() / stats.mean.abs().clamp_min(1e-30)
    return moved, (stats.count >= min_count) & (moved < rel_tol)


def test_reference_fused_update_equals_the_two_step_path():
    n, batch, min_count, rel_tol = len(SHAPES), 5, 15, 0.2
    rows = torch.tensor([3, 0, 7, 1, 6, 2, 5, 4])  # grads[i] feeds row rows[i]
    two, fused = RunningStats.zeros(n), state(n)
    flags_seen = set()
    for probe in range(8):
        grads = grads_of(batch, probe)
        moved, flags = two_step_(two, [grads[int(i)] for i in rows.argsort()], min_count, rel_tol)
        fused_update_reference_(grads, rows, *fused, min_count, rel_tol)
        assert_same(fused[0], two)
        torch.testing.assert_close(fused[1], moved, rtol=1e-12, atol=0.0)
        assert torch.equal(fused[2], flags)
        flags_seen |= set(flags.tolist())
    assert flags_seen == {False, True}  # the flags did flip within the run
    assert two.count.tolist() == [40.0] * n and float(two.mean[rows[6]]) == 0.0  # the empty gradient: zeros


def test_reference_fused_update_leaves_other_rows_alone():
    stats, moved, flags = state(4)
    fused_update_reference_(grads_of(3, 0)[:2], torch.tensor([2, 0]), stats, moved, flags, 1, 10.0)
    assert stats.count.tolist() == [3.0, 0.0, 3.0, 0.0] and flags.tolist() == [True, False, True, False]
    assert moved[1] == float("inf") and moved[0] == 1.0  # the first update moves the mean from 0: by 100 %


class Counting:
    """fused_update_reference_ that counts its launches."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        fused_update_reference_(*args)


def feed(reducer: LFHReducer, backwards: int, batch: int) -> LFHReducer:
    for b in range(backwards):
        grads = grads_of(batch, 100 + b)
        for row in range(len(grads)):
            if (row + b) % 5 != 0:  # some tensors are not reached by some backwards: they get zeros
                reducer.add(row, grads[row])
        reducer.finish()
    return reducer


@pytest.mark.parametrize("flush_bytes", [0, 3000, 1 << 30])
def test_reducer_flushing_mid_backward_gives_the_same_stats(flush_bytes):
    n, batch = len(SHAPES), 6
    hooks = feed(LFHReducer(n, batch, "cpu", 20, 0.1, fused=None), 5, batch)  # reduced in the hooks
    counting = Counting()
    flushed = feed(LFHReducer(n, batch, "cpu", 20, 0.1, flush_bytes=flush_bytes, fused=counting), 5, batch)
    assert_same(flushed.stats, hooks.stats)
    torch.testing.assert_close(flushed.moved, hooks.moved, rtol=1e-12, atol=0.0)
    assert torch.equal(flushed.flags, hooks.flags) and flushed.converged() == hooks.converged()
    if flush_bytes == 0:
        assert counting.calls > 5 * n * 0.7  # one launch per gradient (and one for the unreached ones)
    elif flush_bytes < 1 << 30:
        assert 5 < counting.calls < 5 * n  # several launches per backward
    else:
        assert counting.calls == 5  # one per backward


def test_reducer_refuses_two_gradients_for_one_tensor():
    reducer = LFHReducer(2, 3, "cpu", 1, 0.1, fused=None)
    reducer.add(0, torch.ones(3, 2))
    with pytest.raises(RuntimeError, match="two gradients in one backward"):
        reducer.add(0, torch.ones(3, 2))


def test_reducer_takes_a_batch_folded_into_the_leading_dim_image_by_image():
    # windowed attention: (images x windows, ...), each image's windows together; its trace is each image's sum
    grad = seeded(3 * 4, 5, seed=2)
    folded, batch_first = (LFHReducer(1, 3, "cpu", 1, 0.1, fused=None) for _ in range(2))
    folded.add(0, grad)
    batch_first.add(0, grad.reshape(3, 4 * 5))
    for r in (folded, batch_first):
        r.finish()
    torch.testing.assert_close(folded.stats.mean, batch_first.stats.mean, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="not a multiple of the 3 images x probes"):
        LFHReducer(1, 3, "cpu", 1, 0.1, fused=None).add(0, torch.ones(4, 2))


def test_reducer_on_cpu_uses_the_reference():
    assert LFHReducer(2, 3, "cpu", 1, 0.1).fused is None


def lfh_of(model, x, **cfg):
    gm, _ = fxq.label_free_hessian(model, [x], fxq.LFHConfig(images=x.shape[0], **cfg), fxq.PTQConfig(progress=False))
    return [(q(n).lfh, q(n).lfh_stderr) for n in interest_nodes(gm)], gq(gm).lfh_probes


@pytest.mark.parametrize("cfg", [dict(min_probes=4, max_probes=4, flush_mib=0), dict(min_probes=3, rel_tol=0.05)])
def test_lfh_pass_through_the_flushing_path_matches_the_hooks(tiny_net, monkeypatch, cfg):
    x = seeded(4, 3, 12, 12)
    hooks = lfh_of(tiny_net, x, **cfg)
    monkeypatch.setattr(lfh_cuda, "fused_update_for", lambda device: fused_update_reference_)
    flushed = lfh_of(tiny_net, x, **cfg)
    assert flushed[1] == hooks[1]
    for (t, se), (t_ref, se_ref) in zip(flushed[0], hooks[0]):
        assert t == pytest.approx(t_ref, rel=1e-12) and se == pytest.approx(se_ref, rel=1e-9)


def test_flush_mib_is_checked():
    with pytest.raises(fxq.ConfigError, match="flush_mib must be >= 0"):
        fxq.LFHConfig(flush_mib=-1)


@pytest.fixture(scope="session")
def ext_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("fxq_cache")


@pytest.fixture
def fresh_loader(monkeypatch, ext_cache):
    """load() forgets its cached answer before and after; builds go to one temporary cache per session."""
    monkeypatch.setenv("FXQ_CACHE", str(ext_cache))
    lfh_cuda.load.cache_clear()
    yield monkeypatch
    lfh_cuda.load.cache_clear()


def test_loader_falls_back_with_one_warning(fresh_loader):
    fresh_loader.setenv(lfh_cuda.MODE_ENV, "auto")
    fresh_loader.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    fresh_loader.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="fused LFH kernel is unavailable"):
        assert lfh_cuda.load() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lfh_cuda.load() is None  # the answer is cached: no second warning, no second try
    assert lfh_cuda.fused_update_for("cpu") is None


def test_loader_modes(fresh_loader, ext_cache):
    fresh_loader.setenv(lfh_cuda.MODE_ENV, "reference")
    assert lfh_cuda.load() is None
    lfh_cuda.load.cache_clear()
    fresh_loader.setenv(lfh_cuda.MODE_ENV, "cuda")
    fresh_loader.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    fresh_loader.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(lfh_cuda.KernelUnavailable, match="FXQ_LFH_KERNEL=cuda"):
        lfh_cuda.load()
    fresh_loader.setenv(lfh_cuda.MODE_ENV, "fast")
    with pytest.raises(fxq.ConfigError, match="FXQ_LFH_KERNEL must be one of"):
        lfh_cuda.mode()
    folder = lfh_cuda.build_directory()
    assert folder.parent == ext_cache / "ext" and folder.name == f"{torch.__version__}-{lfh_cuda.source_hash()}"


def nvcc_command(obj: str) -> list[str]:
    """The compile step of torch's own extension build (cpp_extension.load), for the object only."""
    from torch.utils import cpp_extension

    return [
        shutil.which("nvcc") or f"{cpp_extension.CUDA_HOME}/bin/nvcc",
        "-c",
        "-std=c++20",  # torch >= 2.10's headers need C++20 (std::strong_ordering); its builds pass the same
        str(lfh_cuda.SOURCE),
        "-o",
        obj,
        "-DTORCH_EXTENSION_NAME=fxq_lfh_check",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *cpp_extension.COMMON_NVCC_FLAGS,
        *(f"-I{p}" for p in cpp_extension.include_paths("cuda")),
        f"-I{sysconfig.get_paths()['include']}",
        "-gencode=arch=compute_90,code=sm_90",
        "--compiler-options=-fPIC",
    ]


def _has_nvcc() -> bool:
    if shutil.which("nvcc"):
        return True
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME is not None and shutil.which(f"{cpp_extension.CUDA_HOME}/bin/nvcc") is not None


@pytest.mark.slow  # about 20 s on two cores
@pytest.mark.skipif(torch.version.cuda is None, reason="torch is a CPU-only build: no CUDA headers")
def test_fused_source_compiles_with_nvcc(tmp_path):
    if not _has_nvcc():
        pytest.skip("nvcc not found")
    t0 = time.perf_counter()
    done = subprocess.run(nvcc_command(str(tmp_path / "lfh_fused.o")), capture_output=True, text=True)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert (tmp_path / "lfh_fused.o").stat().st_size > 0
    ours = [line for line in log.splitlines() if "lfh_fused.cu" in line and "warning" in line]
    assert not ours, "\n".join(ours)
    print(f"nvcc compile: {time.perf_counter() - t0:.1f} s")


# ---- with a GPU: the kernel against the reference ----


@pytest.fixture
def kernel(fresh_loader):
    fresh_loader.setenv(lfh_cuda.MODE_ENV, "cuda")  # a build failure fails the test, no silent fallback
    return lfh_cuda.fused_update_for("cuda")


def many_shapes(dtype: torch.dtype) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """60 small gradients of 1..300 elements per sample, then a few over several blocks' chunks (2048)."""
    sizes = torch.randint(1, 300, (60,), generator=torch.Generator().manual_seed(3)).tolist()
    small = [((k,), dtype) for k in sizes] + [((3, 5, 2), dtype), ((), dtype)]
    return small + [((64, 33, 31), dtype), ((5000,), dtype), ((2048,), dtype), ((2049,), dtype), ((0,), dtype)]


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, "mixed"])
def test_kernel_equals_the_reference(kernel, dtype):
    shapes = SHAPES * 3 if dtype == "mixed" else many_shapes(dtype)
    n, batch, min_count, rel_tol = len(shapes) + 1, 7, 14, 0.3
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    ours, ref = state(n, "cuda"), state(n, "cuda")
    for launch in range(4):
        grads = grads_of(batch, launch, "cuda", shapes)
        grads.append(torch.randn(11, batch, device="cuda").t())  # not contiguous
        kernel(grads, rows, *ours, min_count, rel_tol)
        fused_update_reference_(grads, rows, *ref, min_count, rel_tol)
        torch.cuda.synchronize()
        assert torch.equal(ours[0].count, ref[0].count)
        assert_same(ours[0], ref[0], rtol=1e-5, atol=1e-30)
        torch.testing.assert_close(ours[1], ref[1], rtol=1e-5, atol=1e-6)
        assert torch.equal(ours[2], ref[2])


@needs_cuda
@pytest.mark.gpu
def test_kernel_rows_and_errors(kernel):
    stats, moved, flags = state(5, "cuda")
    kernel([], torch.zeros(0, dtype=torch.int64), stats, moved, flags, 1, 0.1)  # nothing to do
    assert stats.count.sum() == 0
    kernel([torch.ones(3, 4, device="cuda")], torch.tensor([2]), stats, moved, flags, 1, 0.1)
    assert stats.count.tolist() == [0, 0, 3, 0, 0] and stats.mean[2].item() == 4.0 and stats.m2[2].item() == 0.0
    g = torch.ones(3, 4, device="cuda")
    with pytest.raises(RuntimeError, match="appears twice"):
        kernel([g, g], torch.tensor([1, 1]), stats, moved, flags, 1, 0.1)
    with pytest.raises(RuntimeError, match="batch dimension"):
        kernel([g, torch.ones(2, 4, device="cuda")], torch.tensor([0, 1]), stats, moved, flags, 1, 0.1)


@needs_cuda
@pytest.mark.gpu
def test_reducer_on_cuda_uses_the_kernel(kernel):
    assert LFHReducer(2, 3, "cuda", 1, 0.1).fused is not None


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [dict(min_probes=5, max_probes=5), dict(min_probes=3, rel_tol=0.05, flush_mib=0)])
def test_lfh_pass_with_the_kernel_equals_the_reference(tiny_net, fresh_loader, cfg):
    model, x = copy.deepcopy(tiny_net).cuda(), seeded(4, 3, 12, 12).cuda()
    fresh_loader.setenv(lfh_cuda.MODE_ENV, "reference")
    ref = lfh_of(model, x, **cfg)
    lfh_cuda.load.cache_clear()
    fresh_loader.setenv(lfh_cuda.MODE_ENV, "cuda")
    ours = lfh_of(model, x, **cfg)
    assert ours[1] == ref[1]
    for (t, se), (t_ref, se_ref) in zip(ours[0], ref[0]):
        assert t == pytest.approx(t_ref, rel=1e-5) and se == pytest.approx(se_ref, rel=1e-4)
