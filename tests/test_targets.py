"""Targets and the integer form of their ISA (fxq.targets)."""

import pytest
import torch
from torch import nn

import fxq
from fxq import targets
from fxq.errors import ConfigError
from fxq.quant.modules import QuantWeight
from fxq.targets import INT8, ISA, host_isa, isa_named
from tests.conftest import seeded


@pytest.mark.parametrize(
    "isa, dense, depthwise",
    [
        (ISA.X86_AVX2, (-64, 63), (-128, 127)),
        (ISA.X86_VNNI, (-128, 127), (-128, 127)),
        (ISA.GENERIC, (-128, 127), (-128, 127)),
    ],
)
def test_weight_grids_follow_the_isa(isa, dense, depthwise):
    t = INT8.for_isa(isa)
    assert (t.weight_spec(8, False).qmin, t.weight_spec(8, False).qmax) == dense
    assert (t.weight_spec(8, True).qmin, t.weight_spec(8, True).qmax) == depthwise
    spec = t.weight_spec(8, False)
    assert spec.bits == 8 and spec.levels_per_threshold == -dense[0]  # stored in 8 bits, stepped on its grid
    for depth in (False, True):  # narrower widths fit every ISA's kernels
        assert (t.weight_spec(4, depth).qmin, t.weight_spec(4, depth).qmax) == (-8, 7)
        assert t.weight_spec(4, depth).with_bits(8).qmin == t.weight_spec(8, depth).qmin


def test_host_isa_reads_the_onednn_cap(monkeypatch):
    host_isa.cache_clear()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    try:
        if torch.cpu.get_capabilities().get("architecture", "x86_64") in ("x86_64", "x86"):
            assert host_isa() is ISA.X86_AVX2
    finally:
        host_isa.cache_clear()


def test_isa_names_and_the_config_default():
    assert isa_named("host") is host_isa() and isa_named("x86-avx2") is ISA.X86_AVX2
    with pytest.raises(ConfigError, match="unknown target ISA 'avx3'; choose host or one of"):
        isa_named("avx3")
    assert fxq.PTQConfig().target.isa is host_isa()  # left open, a target takes this machine's ISA
    assert fxq.PTQConfig(target=INT8.for_isa("generic")).target.isa is ISA.GENERIC


def test_quantized_model_reports_its_grids():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.dw = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8)

        def forward(self, x):
            return self.dw(torch.relu(self.conv(x)))

    cfg = fxq.PTQConfig(target=INT8.for_isa(ISA.X86_AVX2), progress=False)
    qgm, report = fxq.quantize(Net().eval(), [seeded(4, 3, 12, 12)], cfg)
    grids = {lr.node: (lr.weight_bits, lr.weight_grid_bits) for lr in report.layers if lr.weight_bits}
    assert grids == {"conv": (8, 7), "dw": (8, 8)}
    assert report.isa == "x86-avx2" and "7-bit grid" in report.integer_form
    assert "8 (7)" in report.table()
    assert isinstance(qgm.get_submodule("conv"), QuantWeight) and qgm.get_submodule("conv").spec.grid_bits == 7


def test_cpu_clock_reads_the_stolen_share_from_the_machine_ticks(monkeypatch, tmp_path):
    stat = tmp_path / "stat"
    real_open = open

    def fake_open(path, *args, **kwargs):
        return real_open(stat if path == "/proc/stat" else path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    stat.write_text("cpu  100 0 50 800 10 0 0 40 0 0\ncpu0 1 2 3\n")
    clock = targets.CpuClock()
    torch.randn(256, 256).matmul(torch.randn(256, 256))  # some of this process's CPU time
    stat.write_text("cpu  400 0 80 900 10 0 0 210 0 0\n")  # 600 more ticks, 170 of them stolen
    spent = clock.read()
    assert spent["stolen_share"] == pytest.approx(170 / 600)
    assert spent["cpu_seconds"] > 0 and spent["wall_seconds"] > 0
    stat.unlink()  # no /proc/stat (another OS): the share is unknown, not 0
    assert targets.CpuClock().read()["stolen_share"] is None
