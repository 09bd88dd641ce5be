"""Targets: what a device can run. Bit options, granularity, threshold form, which ops fuse, and which integer
form its kernels compute exactly.

The backends and the mixed-precision ILP read the same description.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, replace
from enum import Enum
from functools import cache

from fxq.errors import ConfigError
from fxq.quant.qmath import MAX_BITS, MIN_BITS, QSpec

__all__ = ["ISA", "Target", "INT8", "W248A8", "host_isa", "isa_named", "cpu_description", "CpuClock"]


class ISA(Enum):
    """The integer dot product a device's u8 x s8 kernels use, as far as exactness goes.

    X86_AVX2: x86 without VNNI (AVX2, and AVX-512 before VNNI). ONNX Runtime's and oneDNN's u8 x s8 kernels
    multiply with vpmaddubsw, which adds each pair of neighbouring products in a saturating int16: 255 * 127 * 2
    overflows it, 255 * 64 * 2 does not. So weights that a layer sums over several input channels stay on a
    7-bit grid there; depthwise convolutions widen to int32 first and keep the full 8 bits.
    X86_VNNI: AVX512-VNNI, AVX-VNNI or AMX: vpdpbusd adds four products straight into int32, exact.
    ARM64 and GENERIC: int32 accumulation of the products, exact.
    """

    X86_VNNI = "x86-vnni"
    X86_AVX2 = "x86-avx2"
    ARM64 = "arm64"
    GENERIC = "generic"

    @property
    def dense_weight_bits(self) -> int:
        """The widest signed weight grid a layer summing over input channels computes exactly on."""
        return 7 if self is ISA.X86_AVX2 else 8

    @property
    def form(self) -> str:
        """How the integer kernels are fed, for reports and exported files."""
        if self is ISA.X86_AVX2:
            return "u8 activations x s8 weights; weights of layers summing over channels on a 7-bit grid"
        return "u8 activations x s8 weights, full 8-bit grids"


# oneDNN's ISA caps below VNNI (ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA): a host capped there runs AVX2-class kernels
_BELOW_VNNI = {"sse41", "avx", "avx2", "avx512_core", "avx512_mic", "avx512_mic_4ops"}


def isa_named(name: str) -> ISA:
    """An ISA by name; 'host' is this machine's."""
    if name == "host":
        return host_isa()
    try:
        return ISA(name)
    except ValueError:
        raise ConfigError(f"unknown target ISA {name!r}; choose host or one of {[i.value for i in ISA]}") from None


@cache
def host_isa() -> ISA:
    """This machine's ISA class: the CPU's flags (torch.cpu.get_capabilities, else /proc/cpuinfo), capped by
    ONEDNN_MAX_CPU_ISA when it is set below VNNI (oneDNN then runs the saturating kernels)."""
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        return ISA.ARM64
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return ISA.GENERIC
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").lower()
    if cap in _BELOW_VNNI:
        return ISA.X86_AVX2
    return ISA.X86_VNNI if _x86_has_vnni() else ISA.X86_AVX2


def cpu_description() -> str:
    """This CPU for bench tables: its name, the vector ISA torch dispatches to, the dot-product class fxq sees."""
    import torch

    caps = dict(getattr(torch.cpu, "get_capabilities", dict)())
    name = caps.get("cpu_name") or platform.processor() or platform.machine()
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}, {host_isa().value}"


class CpuClock:
    """What a timed stretch cost this process's CPUs, beside its wall time: the process's CPU seconds (all its
    threads) and the share of the machine's CPU time that the hypervisor gave other guests meanwhile (Linux's
    steal time, /proc/stat; None elsewhere). On a shared virtual machine a timing taken while that share is high
    is the neighbours', not the code's: the CPU seconds stay near the work."""

    def __init__(self):
        self._wall, self._cpu, self._ticks = time.perf_counter(), time.process_time(), _cpu_ticks()

    def read(self) -> dict[str, float | None]:
        """{'wall_seconds', 'cpu_seconds', 'stolen_share'} since the clock was made."""
        ticks = _cpu_ticks()
        stolen = None
        if ticks is not None and self._ticks is not None and ticks[1] > self._ticks[1]:
            stolen = (ticks[0] - self._ticks[0]) / (ticks[1] - self._ticks[1])
        return {
            "wall_seconds": time.perf_counter() - self._wall,
            "cpu_seconds": time.process_time() - self._cpu,
            "stolen_share": stolen,
        }


def _cpu_ticks() -> tuple[int, int] | None:
    """(stolen, all) clock ticks of the machine's CPUs since boot, or None without /proc/stat."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    ticks = [int(t) for t in fields[1:9]]  # user nice system idle iowait irq softirq steal (guest is in user)
    return ticks[7], sum(ticks)


def _x86_has_vnni() -> bool:
    import torch

    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        caps = get()
        return any(caps.get(k, False) for k in ("avx512_vnni", "avx_vnni", "amx_int8"))
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


@dataclass(frozen=True)
class Target:
    """A device description.

    weight_bits / act_bits: the default widths (mixed precision chooses per layer from its own bit options).
    per_channel: weights per output channel (activations are always per tensor).
    pot: thresholds restricted to powers of two (fixed-point DSPs and some NPUs need this).
    fuse_activation: a linear op or add followed only by an activation shares one output quantizer.
    quantize_norm_inputs: False leaves float the values that only layer norms read (and those that only feed
    such values, as a transformer's residual adds do): devices compute layer norms in float, and a residual
    stream holds tokens of very different sizes (a class token beside the patch tokens) that one per-tensor grid
    would wipe out. True quantizes them like any other op output (an integer-only device).
    bias_bits: conv/linear biases are integers of this width at step s_x * s_w, as integer kernels add them
    (None: the device adds a float bias).
    isa: the integer dot product of the device (None: this machine's, resolved when a PTQConfig is built); it
    decides the weight grids that its kernels compute exactly (`weight_spec`).
    """

    name: str
    weight_bits: int = 8
    act_bits: int = 8
    per_channel: bool = True
    pot: bool = False
    fuse_activation: bool = True
    quantize_norm_inputs: bool = False
    bias_bits: int | None = 32
    isa: ISA | None = None

    def __post_init__(self):
        for what, b in [("weight_bits", self.weight_bits), ("act_bits", self.act_bits)]:
            if not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS:
                raise ConfigError(f"target {self.name}: {what} must be integers in [{MIN_BITS}, {MAX_BITS}], got {b!r}")
        if self.bias_bits is not None and not (isinstance(self.bias_bits, int) and 8 <= self.bias_bits <= 32):
            raise ConfigError(
                f"target {self.name}: bias_bits must be an integer in [8, 32] or None, got {self.bias_bits!r}"
            )
        if self.isa is not None and not isinstance(self.isa, ISA):
            object.__setattr__(self, "isa", isa_named(str(self.isa)))

    def with_bits(self, weight_bits: int | None = None, act_bits: int | None = None) -> Target:
        """The same target at other default widths (checked like any target)."""
        w = self.weight_bits if weight_bits is None else weight_bits
        a = self.act_bits if act_bits is None else act_bits
        return replace(self, weight_bits=w, act_bits=a)

    def for_isa(self, isa: ISA | str) -> Target:
        """The same target on another integer dot product ('host' for this machine's)."""
        return replace(self, isa=isa if isinstance(isa, ISA) else isa_named(isa))

    @property
    def label(self) -> str:
        isa = self.isa.value if self.isa else "host"
        return f"{self.name}@W{self.weight_bits}A{self.act_bits}/{isa}"

    def weight_spec(self, bits: int, depthwise: bool) -> QSpec:
        """The grid of a `bits`-bit weight on this target: the ISA's exact range for layers that sum over input
        channels (a 7-bit grid held in 8 bits on x86 without VNNI), the full width for depthwise ones."""
        cap = MAX_BITS if depthwise or self.isa is None else self.isa.dense_weight_bits
        return QSpec(bits, signed=True, per_channel=self.per_channel, pot=self.pot, max_grid_bits=cap)


INT8 = Target("int8")  # generic: int8 per-channel weights, int8 per-tensor activations, on this machine's ISA
W248A8 = Target("w248a8", weight_bits=4)  # the paper's research target (mixed precision picks from 2, 4, 8)
