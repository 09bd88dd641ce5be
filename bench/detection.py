"""Whole detectors quantized part by part: mAP@0.5 of the quantized model's detections against the float
model's own detections (pseudo-labels) on the shared val images.

    python bench/detection.py [--models retinanet_resnet50_fpn,fcos_resnet50_fpn] [--images 64] [--json FILE]

No detector weights are available offline, so each model has random weights, settled on the calibration images
(BatchNorm statistics), and a classification head that separates: its prior bias (which puts every score at
0.01, below any threshold) is set to zero and its weights scaled so that its logits have a standard deviation of
1 on the calibration images (scores spread over (0, 1) without saturating). The float
model's detections above --score then serve as ground truth, against which the float model with only its input
rounded to 8 bits gives the ceiling a random network leaves (`map50_input_only`); fxq.quantize (front-end auto: the backbone and the
head quantized, the box decoding and NMS float) is calibrated on 32 calibration images. Written to --json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.ops import box_iou

import fxq
from fxq.data.images import Preprocess, default_data_dir, load_images
from fxq.data.models import settle_random_weights_
from fxq.io.files import write_json_atomic
from fxq.targets import INT8, cpu_description

LOGIT_STD = 1.0  # class logits spread so that sigmoid scores cover (0, 1) without saturating
RAW = Preprocess(resize=320, crop=320, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # detectors normalise inside


def build(name: str, calib: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, min_size=320, max_size=320)
    settle_random_weights_(model.backbone, lambda i: calib[8 * i : 8 * i + 8])
    model.eval()
    logits = _class_logits(model)
    seen = []
    hook = logits.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    with torch.no_grad():
        logits.bias.zero_()
        model(calib[:4])
        hook.remove()
        logits.weight.mul_(LOGIT_STD / float(torch.cat([t.flatten() for t in seen]).std()))
    return model


def _class_logits(model: nn.Module) -> nn.Module:
    head = model.head.classification_head
    return getattr(head, "cls_logits", None) or head.module_list[-1]


def average_precision(found: list[dict], truth: list[dict], iou: float = 0.5) -> float:
    """mAP over the classes the truth holds: detections sorted by score, each matched greedily to an unmatched
    truth box of its class with IoU >= `iou`; AP by all-point interpolation (VOC 2010+)."""
    classes = sorted({int(c) for t in truth for c in t["labels"]})
    aps = []
    for c in classes:
        dets, n_true = [], 0
        for img, (f, t) in enumerate(zip(found, truth)):
            tb = t["boxes"][t["labels"] == c]
            n_true += len(tb)
            fb, fs = f["boxes"][f["labels"] == c], f["scores"][f["labels"] == c]
            ious = box_iou(fb, tb) if len(fb) and len(tb) else torch.zeros(len(fb), len(tb))
            dets += [(float(s), img, ious[k]) for k, s in enumerate(fs)]
        dets.sort(key=lambda d: -d[0])
        used: dict[int, set] = {}
        hits = []
        for _, img, row in dets:
            taken = used.setdefault(img, set())
            best = max(((float(v), j) for j, v in enumerate(row) if j not in taken), default=(0.0, -1))
            hit = best[0] >= iou
            if hit:
                taken.add(best[1])
            hits.append(hit)
        tp = torch.tensor(hits, dtype=torch.float64).cumsum(0)
        if n_true == 0:
            continue
        recall = tp / n_true
        precision = tp / torch.arange(1, len(hits) + 1, dtype=torch.float64)
        # all-point interpolation: precision made monotone from the right, summed over recall steps
        precision = torch.flip(torch.cummax(torch.flip(precision, [0]), 0).values, [0]) if len(hits) else precision
        prev, ap = 0.0, 0.0
        for r, p in zip(recall.tolist(), precision.tolist()):
            ap += (r - prev) * p
            prev = r
        aps.append(ap)
    return sum(aps) / len(aps) if aps else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="retinanet_resnet50_fpn,fcos_resnet50_fpn")
    p.add_argument("--images", type=int, default=64, help="val images to detect on")
    p.add_argument("--score", type=float, default=0.5, help="float detections above this are the pseudo-labels")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    data = default_data_dir() / "imagenet"
    calib = load_images(data / "calib", RAW, subset=32, progress=False).x
    val = load_images(data / "val", RAW, subset=a.images, progress=False).x
    rows = []
    for name in a.models.split(","):
        model = build(name, calib)
        model.score_thresh = 0.05
        start = time.perf_counter()
        qmodel, report = fxq.quantize(model, list(calib.split(8)), fxq.PTQConfig(target=INT8, progress=False))
        seconds = time.perf_counter() - start
        with torch.no_grad():
            ref = [d for x in val.split(8) for d in model(x)]
            out = [d for x in val.split(8) for d in qmodel(x)]
            # the ceiling a random network leaves: the float model with only its input rounded to 8 bits
            rounded = [
                d for x in val.split(8) for d in model(torch.round(x / (x.abs().max() / 127)) * (x.abs().max() / 127))
            ]
        truth = [{k: v[d["scores"] > a.score] for k, v in d.items()} for d in ref]
        row = {
            "model": name,
            "parts": report.settings.get("parts"),
            "float_boxes_above_score": sum(len(t["boxes"]) for t in truth),
            "map50_vs_float": round(average_precision(out, truth), 4),
            "map50_input_only": round(average_precision(rounded, truth), 4),
            "quantize_seconds": round(seconds, 1),
        }
        rows.append(row)
        print(row, flush=True)
    result = {"cpu": cpu_description(), "images": a.images, "score": a.score, "rows": rows}
    if a.json:
        write_json_atomic(a.json, result)


if __name__ == "__main__":
    main()
