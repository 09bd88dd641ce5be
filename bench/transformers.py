"""Where a transformer's W8A8 fidelity goes: the output SQNR with every quantizer, with the weights alone, and with
each activation quantizer alone, under the two activation placements (Target.quantize_norm_inputs).

    python bench/transformers.py [--models vit_b_16,deit_tiny_patch16_224] [--bits 8,4] [--json FILE]

Same models and images as bench/coverage.py (random weights, 4 calibration images, the SQNR on 2 others). Rows:
one per model, placement and weight width; `worst` lists the activation quantizers that cost the most when each
is the only one applied. Rows are written to --json as they finish and skipped when the script runs again.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch
from coverage import _images, _size, _sqnr, build

import fxq
from fxq.io.files import write_json_atomic
from fxq.quant.modules import ActQuant
from fxq.targets import INT8, cpu_description


def _group(name: str) -> str:
    import torchvision

    return "torchvision" if name in torchvision.models.list_models(module=torchvision.models) else "timm"


def measure(name: str, bits: int, norm_inputs: bool) -> dict:
    model = build(_group(name), name)
    size = _size(name)
    calib, x = [_images(2, size, 1), _images(2, size, 3)], _images(2, size, 2)
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vit_b_16,deit_tiny_patch16_224")
    p.add_argument("--bits", default="8,4")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    rows = json.loads(a.json.read_text())["rows"] if a.json and a.json.exists() else []
    for name in a.models.split(","):
        for bits in (int(b) for b in a.bits.split(",")):
            for norm_inputs in (True, False):
                key = (name, bits, norm_inputs)
                if any((r["model"], r["weight_bits"], r["quantize_norm_inputs"]) == key for r in rows):
                    continue  # measured by an earlier run into the same file
                rows.append(measure(name, bits, norm_inputs))
                print(json.dumps(rows[-1]), flush=True)
                if a.json:
                    write_json_atomic(a.json, {"cpu": cpu_description(), "rows": rows})


if __name__ == "__main__":
    main()
