"""Micro-benchmarks of fxq's own kernels: two CPU threads, seeded inputs, the CPU named in the header."""

from __future__ import annotations

import os

import pytest
import torch

import fxq

# the same on every machine, so that saved runs compare; FXQ_BENCH_THREADS overrides it (say, 1 on a machine
# another job keeps busy: two threads on one free core wait a scheduler slice at every parallel region)
torch.set_num_threads(int(os.environ.get("FXQ_BENCH_THREADS", "2")))
# the command line's memory policy (fxq.memory); FXQ_BENCH_ALLOCATOR=system keeps the C library's defaults
KEPT = os.environ.get("FXQ_BENCH_ALLOCATOR", "keep") != "system" and fxq.keep_freed_memory()


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A seeded standard normal tensor (its own generator: no test moves another's inputs)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture(scope="session")
def seeded():
    """`seeded(*shape, seed=0)`: seeded standard normal inputs."""
    return randn


def pytest_configure(config):
    # Inductor's own oneDNN lowering, on every int8 compile: not ours to fix
    config.addinivalue_line("filterwarnings", "ignore:To copy construct from a tensor:UserWarning")


def pytest_report_header(config):
    from fxq.targets import cpu_description

    return (
        f"fxq micro-benchmarks: CPU {cpu_description()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"allocator {'fxq.keep_freed_memory' if KEPT else 'system defaults'}"
    )
