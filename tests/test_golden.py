"""Golden runs: TinyNet and the CIFAR-10 ResNet-20 quantized RTN W8/W4, EPTQ for 50 steps and mixed precision at
4 bits/weight, and their LFH traces, against the fingerprints in tests/golden/ (see tests/golden.py).

Refactors keep these bit-identical; a change that means to move numbers rewrites them (FXQ_WRITE_GOLDEN=1) and
says so in its commit.
"""

import pytest
import torch

import fxq
from fxq.config import LFHConfig, Method, MixedPrecisionConfig, PTQConfig, RoundingConfig
from fxq.data.images import batches, load_npz_images
from fxq.data.models import load_model
from fxq.targets import INT8, ISA
from tests import golden
from tests.conftest import seeded
from tests.test_cifar import CALIB_SET, needs_cifar

GENERIC = INT8.for_isa(ISA.GENERIC)  # full 8-bit grids: the form the golden runs were recorded in
LFH = LFHConfig(min_probes=2, max_probes=4, images=16, batch_size=8)


def _configs(target) -> dict[str, PTQConfig]:
    base = dict(lfh=LFH, progress=False)
    return {
        "rtn_w8": PTQConfig(target=target.with_bits(8), **base),
        "rtn_w4": PTQConfig(target=target.with_bits(4), **base),
        "eptq_w4_50": PTQConfig(
            target=target.with_bits(4),
            method=Method.EPTQ,
            rounding=RoundingConfig(iterations=50, batch_size=8, seed=0),
            **base,
        ),
        "mp_4bits": PTQConfig(
            target=target.with_bits(8),
            mixed_precision=MixedPrecisionConfig(avg_bits=4.0, images=16, batch_size=8, check_images=16),
            **base,
        ),
    }


def _runs(model, calib: list[torch.Tensor], target) -> dict:
    found = {}
    for name, cfg in _configs(target).items():
        torch.manual_seed(0)
        qgm, report = fxq.quantize(model, calib, cfg)
        found[name] = golden.fingerprint(qgm)
        if name == "eptq_w4_50":
            found["lfh"] = golden.lfh_values(report)
    return found


def test_tiny_net_golden(tiny_net):
    calib = [seeded(8, 3, 16, 16, seed=i) for i in range(4)]
    golden.check("tiny_net", _runs(tiny_net, calib, GENERIC))


@pytest.mark.slow
@needs_cifar
def test_resnet20_golden():
    lm = load_model("cifar10_resnet20")
    images = load_npz_images(CALIB_SET, lm.preprocess, progress=False)
    calib = batches(images.x[::16], 16)  # every 16th: the set is sorted by class
    golden.check("resnet20", _runs(lm.model, calib, GENERIC))
