"""fxq.keep_freed_memory: a large buffer a step frees stays in the process for the next step (glibc), instead of
being unmapped and faulted in again."""

import platform
import subprocess
import sys

import pytest

_PROBE = """
import ctypes, sys, torch
import fxq
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
before = fxq.memory.keeps_freed_memory()
applied = fxq.keep_freed_memory() if sys.argv[1] == "keep" else None
x = torch.ones(50 * 2**20)  # 200 MB, freed at once
del x
print(applied, libc.mallinfo2().fordblks, before, fxq.memory.keeps_freed_memory())
"""


def _free_bytes_kept(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    applied, kept, before, after = out.stdout.split()
    assert before == "False" and after == str(mode == "keep")  # what the rounding's memory estimate reads
    return applied, int(kept)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc policy")
def test_freed_buffers_stay_in_the_process_only_when_asked():
    applied, kept = _free_bytes_kept("keep")
    assert applied == "True" and kept >= 200 * 2**20
    _, system = _free_bytes_kept("system")
    assert system < 200 * 2**20  # glibc's default unmaps a buffer that large when it is freed
