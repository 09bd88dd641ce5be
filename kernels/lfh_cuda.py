"""The fused LFH kernel (kernels/lfh_fused.cu): built with torch.utils.cpp_extension on first use, cached on disk.

`FXQ_LFH_KERNEL` picks the path: `auto` (default) uses the kernel when it builds and warns once, naming the
reason, when it does not (CPU-only torch, no nvcc, a build error), so runs fall back to the PyTorch reference;
`cuda` raises instead (a build that must not silently fall back); `reference` never builds. The build lands in
`$FXQ_CACHE/ext/<torch version>-<source hash>` (default `~/.cache/fxq`), so a changed source or torch rebuilds
and an unchanged one loads in seconds.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from fxq.errors import ConfigError
from fxq.kernels.lfh_reduce import FusedUpdate, RunningStats

__all__ = ["SOURCE", "MODE_ENV", "KernelUnavailable", "mode", "build_directory", "load", "fused_update_for"]

SOURCE = Path(__file__).with_name("lfh_fused.cu")
MODE_ENV = "FXQ_LFH_KERNEL"
MODES = ("auto", "cuda", "reference")


class KernelUnavailable(RuntimeError):
    """FXQ_LFH_KERNEL=cuda, but the fused kernel cannot be built or loaded here."""


def mode() -> str:
    value = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ConfigError(f"{MODE_ENV} must be one of {list(MODES)}, got {value!r}")
    return value


def source_hash() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]


def build_directory() -> Path:
    """One folder per torch version and source: builds never overwrite one another's objects."""
    root = Path(os.environ["FXQ_CACHE"]) if os.environ.get("FXQ_CACHE") else Path.home() / ".cache" / "fxq"
    return root / "ext" / f"{torch.__version__}-{source_hash()}"


def _why_not_buildable() -> str | None:
    """The first missing build prerequisite, in words; None when a build can be tried."""
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return "torch is a CPU-only build"
    if cpp_extension.CUDA_HOME is None and shutil.which("nvcc") is None:
        return "nvcc not found (install the CUDA toolkit or set CUDA_HOME)"
    if not cpp_extension.is_ninja_available():
        return "ninja not found (pip install ninja)"
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return "no CUDA device (set TORCH_CUDA_ARCH_LIST to build without one)"
    return None


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    folder = build_directory()
    folder.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=f"fxq_lfh_{source_hash()}",
        sources=[str(SOURCE)],
        build_directory=str(folder),
        extra_cuda_cflags=["-O3"],
        verbose=False,
    )


def _last_lines(text: str, n: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


@functools.cache
def load() -> ModuleType | None:
    """The built extension, or None (after one warning saying why) so that callers use the reference."""
    chosen = mode()
    if chosen == "reference":
        return None
    reason = _why_not_buildable()
    if reason is None:
        try:
            return _build()
        except Exception as e:  # a compiler or linker error: report it, run on the reference
            reason = f"the build failed: {type(e).__name__}: {_last_lines(str(e))}"
    if chosen == "cuda":
        raise KernelUnavailable(f"{MODE_ENV}=cuda, but the fused LFH kernel is unavailable: {reason}")
    warnings.warn(
        f"fxq: the fused LFH kernel is unavailable ({reason}); using the PyTorch reference. "
        f"Set {MODE_ENV}=reference to silence this.",
        RuntimeWarning,
        stacklevel=2,
    )
    return None


def _call(ext: ModuleType, grads: list[Tensor], rows: Tensor, stats: RunningStats, *flags_and_limits) -> None:
    """FusedUpdate's signature over the extension, which takes the statistics as three tensors."""
    ext.fused_update_(grads, rows, stats.count, stats.mean, stats.m2, *flags_and_limits)


def fused_update_for(device: torch.device | str) -> FusedUpdate | None:
    """The fused kernel with fused_update_reference_'s signature for data on `device`; None: use the reference."""
    if torch.device(device).type != "cuda":
        return None
    ext = load()
    return None if ext is None else functools.partial(_call, ext)
