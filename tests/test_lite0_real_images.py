"""EfficientNet-Lite0 with its real weights on the shared ImageNet images (skipped where they are absent)."""

import pytest
import torch

import fxq
from fxq.data.evaluate import evaluate
from fxq.data.images import batches, load_images
from fxq.data.subset import Subset
from tests.conftest import IMAGENET, needs_imagenet, sqnr_db

pytest.importorskip("efficientnet_lite_pytorch")
pytestmark = needs_imagenet


@pytest.fixture(scope="module")
def lite0():
    from fxq.data.models import load_model

    lm = load_model("efficientnet_lite0")
    calib = load_images(IMAGENET / "calib", lm.preprocess, subset=Subset(64, first=True), progress=False)
    val = load_images(IMAGENET / "val", lm.preprocess, subset=Subset(200, first=True), labeled=True, progress=False)
    return lm, calib, val


def test_w8a8_keeps_float_accuracy(lite0):
    lm, calib, val = lite0
    qgm, report = fxq.quantize(lm.model, batches(calib.x, 32), fxq.PTQConfig(progress=False))
    f, q = evaluate(lm.model, val.x, val.y, progress=False), evaluate(qgm, val.x, val.y, progress=False)
    assert q["top1"] >= f["top1"] - 1.5, (f, q)  # 200 images: one image is 0.5 points
    assert sum(lr.weight_bits is not None for lr in report.layers) == 50  # all 49 convs and the classifier


def test_export_frontend_matches_fx(lite0):
    lm, calib, val = lite0
    data = batches(calib.x[:16], 8)
    fx_q, _ = fxq.quantize(lm.model, data, fxq.PTQConfig(progress=False, frontend="fx"))
    ex_q, _ = fxq.quantize(lm.model, data, fxq.PTQConfig(progress=False, frontend="export"))
    with torch.no_grad():
        x = val.x[:16]
        ref = lm.model(x)
        fx_sq, ex_sq = sqnr_db(ref, fx_q(x)), sqnr_db(ref, ex_q(x))
    # both front-ends give the same quantizer placement; thresholds differ only by the random samples
    assert fx_sq > 15 and ex_sq > 15 and abs(fx_sq - ex_sq) < 2, (fx_sq, ex_sq)


def test_lfh_ranking_is_stable_across_seeds(lite0):
    lm, calib, _ = lite0
    traces = []
    for seed in (0, 1):
        cfg = fxq.LFHConfig(min_probes=10, max_probes=10, images=8, batch_size=8, seed=seed)
        _, report = fxq.label_free_hessian(lm.model, [calib.x[:8]], cfg, fxq.PTQConfig(progress=False))
        traces.append(torch.tensor([lr.lfh_weight for lr in report.layers if lr.interest]))
    assert len(traces[0]) == 25  # 16 project convs + 9 residual adds; the classifier output is the probe point
    ranks = [t.argsort().argsort().double() for t in traces]
    assert float(torch.corrcoef(torch.stack(ranks))[0, 1]) >= 0.95
