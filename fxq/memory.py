"""Process memory policy for long CPU runs: keep freed memory in the process instead of returning it to the OS.

A rounding step, an LFH probe or a calibration batch frees activation buffers of many megabytes and allocates
the same sizes again a moment later. With glibc's defaults, buffers that large are mmap'd and unmapped on every
free (and the heap's top is trimmed), so each step faults its memory back in page by page, and on some machines
the kernel's page-fault work costs more than the arithmetic. `keep_freed_memory()` serves large buffers from the
heap and never trims it, so a step reuses the pages the last one freed. The process then keeps its peak memory
until it exits. The fxq command line and the bench scripts call it; a library user opts in.
"""

from __future__ import annotations

import ctypes
import platform

import torch

__all__ = ["keep_freed_memory", "keeps_freed_memory", "available_bytes", "size_text"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_INT_MAX = 2**31 - 1
_kept = False  # keep_freed_memory() took effect in this process


def keep_freed_memory() -> bool:
    """Set glibc malloc to serve allocations up to 1 GiB from the heap and never trim it (process-wide).
    True when applied; False (and nothing changed) on a C library other than glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    global _kept
    _kept = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
    return _kept


def keeps_freed_memory() -> bool:
    """Whether keep_freed_memory() is in effect: the process's memory then stays at its high-water mark, and the
    freed buffers it reuses fragment, so a run needs more of the machine's memory than it holds live."""
    return _kept


def available_bytes(device: torch.device) -> int | None:
    """Memory a new allocation on `device` can take now: free GPU memory, or the kernel's MemAvailable on Linux;
    None where neither is known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def size_text(n: float) -> str:
    """A byte count for a message: '1.5 GiB', '12.0 MiB' or '900 B'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size or unit == "KiB" and n >= 1000:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"
