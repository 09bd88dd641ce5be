"""Where a transformer's W8A8 fidelity goes: the output SQNR with every quantizer, with the weights alone, and with
each activation quantizer alone, under the two activation placements (Target.quantize_norm_inputs).

    python bench/transformers.py [--models vit_b_16,deit_tiny_patch16_224] [--bits 8,4] [--json FILE]
    python bench/transformers.py --rounding-images 4,16,64 [--steps N] [--starts s0.8,noaim] [--models ...]
        [--real-images] [--eval-images 16]
    python bench/transformers.py --layers-alone 64 --models vit_b_16 [--json FILE]
    python bench/transformers.py --feedback-gain 64 [--models ...] [--json FILE]
    python bench/transformers.py --class-token 32 [--models ...] [--json FILE]

Same models and images as bench/coverage.py (random weights, 4 calibration images, the SQNR on 2 others); with
--real-images every mode but the first reads the shared ImageNet images instead (calibration images from
imagenet/calib, the SQNR on --eval-images of imagenet/val): a patch embedding's inputs are pixel patches, whose
second moments random images make isotropic and real ones do not. Rows: one per model, placement and weight width;
`worst` lists the activation quantizers that cost the most when each is the only one applied. With
--rounding-images, W4A8 rows instead (default placement; --rounding-bits for another weight width): round-to-nearest
against the layer-local rounding (EPTQ's layer-local start with no whole-network steps), calibrated on N images
each. With --steps N, also the layer-local rounding followed by N whole-network steps of 8 images (the distillation
terms weighted alike, no LFH). With --layers-alone N, activations float: the SQNR with every weight layer at 4 bits
and with each alone. With --starts, also the layer-local rounding with other settings, '+'-joined: sS, a share S of
each layer's objective weighing its output positions by the output's sensitivity (RoundingConfig.
start_sensitivity); noaim, each layer rounding its float weights (RoundingConfig.start_aim off). With
--feedback-gain N, what error feedback can win over round-to-nearest in each weight layer, from the float inputs'
second moments on N images (measure_feedback_gain). With --class-token N, each linear layer alone at 4 bits under
three roundings (measure_class_token_weighting).
Rows are written to --json as they finish and skipped when the script runs again.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from coverage import _images, _inputs, _size, _sqnr, build
from torch import nn

import fxq
from fxq.data.images import Preprocess, default_data_dir, load_images
from fxq.io.files import write_json_atomic
from fxq.quant.modules import ActQuant, QuantWeight, layer_forward
from fxq.targets import INT8, cpu_description


def _group(name: str) -> str:
    import torchvision

    return "torchvision" if name in torchvision.models.list_models(module=torchvision.models) else "timm"


def measure(name: str, bits: int, norm_inputs: bool) -> dict:
    model = build(_group(name), name)
    calib, x = _inputs(_group(name), name)
    target = replace(INT8.with_bits(bits, 8), quantize_norm_inputs=norm_inputs)
    qgm, _ = fxq.quantize(model, calib, fxq.PTQConfig(target=target, progress=False))
    acts = {n: m for n, m in qgm.named_modules() if isinstance(m, ActQuant)}
    forward = {n: m.forward for n, m in acts.items()}
    with torch.no_grad():
        ref = model(x)
        every = _sqnr(ref, qgm(x))
        for m in acts.values():
            m.forward = lambda t: t  # the quantizer passes its input through
        weights_only = _sqnr(ref, qgm(x))
        alone = []
        for n, m in acts.items():
            m.forward = forward[n]
            alone.append((round(_sqnr(ref, qgm(x)), 2), n))
            m.forward = lambda t: t
    return {
        "model": name,
        "weight_bits": bits,
        "quantize_norm_inputs": norm_inputs,
        "act_quantizers": len(acts),
        "sqnr": round(every, 2),
        "sqnr_weights_only": round(weights_only, 2),
        "worst": sorted(alone)[:3],
    }


@dataclass(frozen=True)
class Images:
    """Where a row's images come from: random images drawn by seed (the coverage table's), or the shared ImageNet
    calibration and val images (`real`); the SQNR is taken on `evaluation` images."""

    real: bool = False
    evaluation: int = 2

    @property
    def label(self) -> str:
        return "imagenet" if self.real else "random"

    def calibration(self, size: int, images: int) -> list[torch.Tensor]:
        """Batches of 2 of `images` calibration images."""
        if not self.real:
            return [_images(2, size, 100 + i) for i in range(max(images // 2, 1))]
        return list(self._load("calib", size, images).split(2))

    def held_out(self, size: int) -> torch.Tensor:
        """The images the SQNR is taken on."""
        return self._load("val", size, self.evaluation) if self.real else _images(self.evaluation, size, 2)

    @staticmethod
    def _load(folder: str, size: int, count: int) -> torch.Tensor:
        pre = Preprocess(resize=size * 256 // 224, crop=size)  # torchvision's ImageNet evaluation transform
        return load_images(default_data_dir() / "imagenet" / folder, pre, subset=count, progress=False).x


def _start_settings(variant: str) -> dict:
    """The RoundingConfig settings of a --starts entry ('' for the defaults)."""
    out = {}
    for part in filter(None, variant.split("+")):
        if part == "noaim":
            out["start_aim"] = False
        elif part.startswith("s"):
            out["start_sensitivity"] = float(part[1:])
        else:
            raise SystemExit(f"--starts: {part!r} is neither sS (a share) nor noaim")
    return out


def _rounded(
    name: str, images: int, start: str | None, steps: int = 0, variant: str = "", source=Images(), bits: int = 4
):
    """The float model, its W`bits`A8 graph after round-to-nearest (start None) or the layer-local rounding on
    `images` calibration images of `source` (with the settings of `variant`, a --starts entry; then `steps`
    whole-network steps of 8 images, the distillation terms weighted alike), and the images the SQNR is taken on."""
    model = build(_group(name), name)
    size = _size(name)
    calib, x = source.calibration(size, images), source.held_out(size)
    method = fxq.Method.RTN if start is None else fxq.Method.EPTQ
    rounding = fxq.RoundingConfig(
        start=start or "float", iterations=steps, batch_size=8, loss_weights="mean", **_start_settings(variant)
    )
    # the rows with steps take long on a CPU: their progress bars (with the ETA) go to stderr
    cfg = fxq.PTQConfig(target=INT8.with_bits(bits, 8), method=method, rounding=rounding, progress=steps > 0)
    qgm, _ = fxq.quantize(model, calib, cfg)
    return model, qgm, x


def _rounding_label(start: str | None, steps: int, variant: str) -> str:
    return (start or "nearest") + (f"@{variant}" if variant else "") + (f"+{steps}" if steps else "")


def measure_rounding(
    name: str, images: int, start: str | None, steps: int = 0, variant: str = "", source=Images(), bits: int = 4
) -> dict:
    """W`bits`A8 output SQNR after round-to-nearest (start None) or the layer-local rounding on `images` images of
    `source` (with the settings of `variant`), and `steps` whole-network steps after it; the seconds fxq.quantize
    took, and the worst held-out image's SQNR."""
    t0 = time.perf_counter()
    model, qgm, x = _rounded(name, images, start, steps, variant, source, bits)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        ref, out = model(x), qgm(x)
    return {
        "model": name,
        "weight_bits": bits,
        "images": images,
        "images_from": source.label,
        "eval_images": len(x),
        "rounding": _rounding_label(start, steps, variant),
        "sqnr": round(_sqnr(ref, out), 2),
        "sqnr_worst_image": round(min(_sqnr(r, o) for r, o in zip(ref, out)), 2),
        "seconds": round(seconds, 1),
    }


def _float_forward(qw: QuantWeight):
    """The layer's float forward: its float weight and its bias before bias correction (the layer's own bias holds
    the correction for its quantized weight, which on a float weight is an error of its own)."""
    return lambda t: layer_forward(qw.layer, t, qw.layer.weight, qw.uncorrected_bias())


@torch.no_grad()
def measure_layers_alone(name: str, images: int, source=Images()) -> dict:
    """Activations float: the output SQNR with every weight layer at 4 bits, and with each one alone at 4 bits (the
    others float), under round-to-nearest and the layer-local rounding."""
    (model, rtn, x), (_, local, _) = (
        _rounded(name, images, None, source=source),
        _rounded(name, images, "layerwise", source=source),
    )
    ref = model(x)
    for g in (rtn, local):
        for m in g.modules():
            if isinstance(m, ActQuant):
                m.forward = lambda t: t  # the quantizer passes its input through
    every = {"nearest": round(_sqnr(ref, rtn(x)), 2), "layerwise": round(_sqnr(ref, local(x)), 2)}
    nearest = {n: m for n, m in rtn.named_modules() if isinstance(m, QuantWeight)}
    chosen = {n: m for n, m in local.named_modules() if isinstance(m, QuantWeight)}
    quantized = {n: m.forward for n, m in nearest.items()}
    for m in nearest.values():
        m.forward = _float_forward(m)
    alone = {}
    for n, m in nearest.items():  # the RTN graph, one layer at a time at its RTN or its layer-local weights
        m.forward = quantized[n]
        at_nearest = _sqnr(ref, rtn(x))
        m.forward = chosen[n].forward
        alone[n] = (round(at_nearest, 2), round(_sqnr(ref, rtn(x)), 2))
        m.forward = _float_forward(m)
    return {
        "model": name,
        "weight_bits": 4,
        "images": images,
        "images_from": source.label,
        "eval_images": len(x),
        "every_layer": every,
        "alone": alone,
    }


def _input_rows(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A layer's input as the rows its weight multiplies: a convolution's patches, a linear layer's tokens."""
    if isinstance(module, nn.Conv2d):
        t = F.unfold(t, module.kernel_size, module.dilation, module.padding, module.stride).transpose(1, 2)
    return t.reshape(-1, t.shape[-1])


def _input_moments(run, layers: dict, batches: list[torch.Tensor]) -> tuple[dict, dict]:
    """Each of `layers`' input second moments, summed over the calibration `batches` run through `run`: over
    every row (token or patch), and over the class token's rows alone (linear layers' 3-d inputs: batch, tokens,
    features)."""
    every: dict[str, torch.Tensor] = {}
    first: dict[str, torch.Tensor] = {}

    def hook(n: str):
        def take(module, args):
            t = args[0].double()
            rows = _input_rows(module, t)
            every[n] = every.get(n, 0) + rows.T @ rows
            if t.dim() == 3:
                first[n] = first.get(n, 0) + t[:, 0].T @ t[:, 0]

        return take

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    for batch in batches:
        run(batch)
    for h in handles:
        h.remove()
    return every, first


@torch.no_grad()
def measure_feedback_gain(name: str, images: int, source=Images()) -> dict:
    """What error feedback can win over round-to-nearest in each weight layer, from its float inputs alone: with
    input second moments H = L L^T (damped as the layer-local rounding damps them), rounding each input column in
    turn and passing its error on leaves column i an error of variance proportional to L_ii^2 where rounding to
    nearest leaves H_ii (at a fine grid, the same step), so the layer's output error shrinks by sum(H_ii) /
    sum(L_ii^2). Near-isotropic inputs give 0 dB: no rounding of that layer's weights beats round-to-nearest by
    much. Layers called as modules (torchvision's attention projections are not: they are read through the
    attention's input), and ungrouped convolutions (a patch embedding)."""
    from fxq.eptq.layerwise import DAMPING

    model = build(_group(name), name)
    layers = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.MultiheadAttention)) or isinstance(m, nn.Conv2d) and m.groups == 1
    }
    sums, _ = _input_moments(model, layers, source.calibration(_size(name), images))
    gains = {}
    for n, h in sums.items():
        d = h + DAMPING * h.diagonal().mean() * torch.eye(len(h), dtype=h.dtype)
        chol = torch.linalg.cholesky(d).diagonal().square()
        gains[n] = round(10 * float(torch.log10(d.diagonal().sum() / chol.sum())), 2)
    values = torch.tensor(list(gains.values()))
    return {
        "model": name,
        "images": images,
        "images_from": source.label,
        "feedback_gain_db": {"median": round(float(values.median()), 2), "max": round(float(values.max()), 2)},
        "layers": gains,
    }


@torch.no_grad()
def measure_class_token_weighting(name: str, images: int, source=Images()) -> dict:
    """Activations float, one weight layer at 4 bits at a time (the others float): the output SQNR under
    round-to-nearest, under error feedback on its inputs' second moments over every token (the layer-local
    rounding's H), and under error feedback with the class token's rows weighing as much as all the others; then
    each of the three with every linear layer at its choice at once."""
    from fxq.eptq.layerwise import layerwise_choice, use_choice_

    model, rtn, x = _rounded(name, images, None, source=source)
    for m in rtn.modules():
        if isinstance(m, ActQuant):
            m.forward = lambda t: t
        elif isinstance(m, QuantWeight) and not isinstance(m.layer, nn.Linear):
            m.forward = _float_forward(m)  # the patch embedding
    layers = {n: m for n, m in rtn.named_modules() if isinstance(m, QuantWeight) and isinstance(m.layer, nn.Linear)}
    quantized = {n: m.forward for n, m in layers.items()}
    for m in layers.values():
        m.forward = _float_forward(m)
    every, first = _input_moments(rtn, layers, source.calibration(_size(name), images))
    ref = model(x)
    rows, chosen = {}, {"feedback": {}, "weighted": {}}
    for n, m in layers.items():
        m.forward = quantized[n]
        nearest = _sqnr(ref, rtn(x))
        h_all = every[n] / every[n].diagonal().sum()
        m.forward = m.__class__.forward.__get__(m)
        chosen["feedback"][n] = chosen["weighted"][n] = layerwise_choice(m, h_all.float().unsqueeze(0))
        use_choice_(m, chosen["feedback"][n])
        feedback = _sqnr(ref, rtn(x))
        weighted = None
        if n in first:
            h_cls = h_all + first[n] / first[n].diagonal().sum()
            chosen["weighted"][n] = layerwise_choice(m, h_cls.float().unsqueeze(0))
            use_choice_(m, chosen["weighted"][n])
            weighted = round(_sqnr(ref, rtn(x)), 2)
        m.live = None
        m.forward = _float_forward(m)
        rows[n] = (round(nearest, 2), round(feedback, 2), weighted)
    table = torch.tensor([[r[0], r[1], r[2] if r[2] is not None else float("nan")] for r in rows.values()])
    # the same choices, every linear layer at once (the patch embedding float): what adding the powers predicts
    together = {}
    for n, m in layers.items():
        m.forward = quantized[n]
    together["nearest"] = round(_sqnr(ref, rtn(x)), 2)
    for label, choices in chosen.items():
        for n, m in layers.items():
            m.forward = m.__class__.forward.__get__(m)
            use_choice_(m, choices[n])
        together[label] = round(_sqnr(ref, rtn(x)), 2)
    return {
        "model": name,
        "images": images,
        "images_from": source.label,
        "eval_images": len(x),
        "class_token_median_db": [round(float(v), 2) for v in table.nanmedian(0).values],
        "class_token_every_layer_db": together,
        "class_token_layers": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vit_b_16,deit_tiny_patch16_224")
    p.add_argument("--bits", default="8,4")
    p.add_argument("--rounding-images", default="", help="e.g. 4,16,64: the W4A8 rounding rows")
    p.add_argument("--rounding-bits", type=int, default=4, help="with --rounding-images: the weight width")
    p.add_argument("--steps", type=int, default=0, help="with --rounding-images: also N whole-network steps after")
    p.add_argument("--layers-alone", type=int, default=0, help="N: each weight layer alone at 4 bits, N images")
    p.add_argument("--feedback-gain", type=int, default=0, help="N: each linear layer's error-feedback gain, N images")
    p.add_argument(
        "--class-token", type=int, default=0, help="N: each layer alone, its H with the class token weighted"
    )
    p.add_argument("--starts", default="", help="e.g. s0.8,noaim,noaim+s0.8: with --rounding-images, more starts")
    p.add_argument("--real-images", action="store_true", help="the shared ImageNet images instead of random ones")
    p.add_argument("--eval-images", type=int, default=2, help="the images the SQNR is taken on")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    source = Images(a.real_images, a.eval_images)

    def same_images(row: dict) -> bool:
        """Whether `row` was measured on this run's images (rows without the keys: random, the SQNR on 2)."""
        return (row.get("images_from", "random"), row.get("eval_images", 2)) == (source.label, source.evaluation)

    rows = json.loads(a.json.read_text())["rows"] if a.json and a.json.exists() else []

    def add(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.json:
            write_json_atomic(a.json, {"cpu": cpu_description(), "rows": rows})

    # the per-layer modes: one row per model, N images each, a row found by its key
    per_layer = [
        (a.class_token, "class_token_median_db", measure_class_token_weighting),
        (a.feedback_gain, "feedback_gain_db", measure_feedback_gain),
        (a.layers_alone, "alone", measure_layers_alone),
    ]
    for images, key, measure_one in per_layer:
        if images:
            for name in a.models.split(","):
                if not any(r["model"] == name and key in r and same_images(r) for r in rows):
                    add(measure_one(name, images, source))
            return
    if a.rounding_images:
        for name in a.models.split(","):
            for images in (int(n) for n in a.rounding_images.split(",")):
                variants = [v for v in a.starts.split(",") if v]
                runs = [(None, 0, ""), ("layerwise", 0, "")] + [("layerwise", 0, v) for v in variants]
                runs += [("layerwise", a.steps, "")] * (a.steps > 0)
                for start, steps, variant in runs:
                    key = (name, a.rounding_bits, images, _rounding_label(start, steps, variant))
                    if not any(
                        (r["model"], r["weight_bits"], r.get("images"), r.get("rounding")) == key and same_images(r)
                        for r in rows
                    ):
                        add(measure_rounding(name, images, start, steps, variant, source, a.rounding_bits))
        return
    for name in a.models.split(","):
        for bits in (int(b) for b in a.bits.split(",")):
            for norm_inputs in (True, False):
                key = (name, bits, norm_inputs)
                if any((r["model"], r["weight_bits"], r.get("quantize_norm_inputs")) == key for r in rows):
                    continue  # measured by an earlier run into the same file
                add(measure(name, bits, norm_inputs))


if __name__ == "__main__":
    main()
