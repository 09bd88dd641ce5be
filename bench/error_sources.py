"""Where a quantized model's distance from float comes from: its weights, its activations, the layers one by one.

    python bench/error_sources.py [--model M] [--bits 8] [--act-bits 8] [--top 12] [--json FILE]
                                  [--start [--start-sweeps N] | --load FOLDER]

RTN at the given widths (or the layer-local start's rounding, or a model fxq.save wrote), then the same graph with
parts of it computing in float (a module whose forward is its float layer's, with the float weights and bias of
RTN's graph, or the identity for an activation quantizer): top-1 on all val images, the share of them whose top-1
agrees with the float model's, and the mean KL divergence of the float model's softmax from the quantized one's on
those images (label-free, and steadier than top-1). Then each weight layer, and each activation quantizer, alone
quantized in an otherwise float graph: its KL on the last 128 calibration images.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import replace
from functools import partial

import torch.nn.functional as F
from torch import Tensor, nn

import fxq
from fxq.config import Method, PTQConfig, RoundingConfig
from fxq.data.evaluate import evaluate, log_probs
from fxq.data.images import batches, load_images
from fxq.data.models import DEFAULT_MODEL, default_image_sets, load_model
from fxq.io.files import write_json_atomic
from fxq.quant.modules import ActQuant, QuantWeight, layer_forward
from fxq.targets import INT8


def _in_float_(modules: Iterable[nn.Module], on: bool, floats: dict[nn.Module, tuple[Tensor, Tensor]]) -> None:
    """Each module computes in float (its layer with its float weight and bias from `floats`, or the identity for
    an activation quantizer), or quantized again."""
    for m in modules:
        if not on:
            m.__dict__.pop("forward", None)
        elif isinstance(m, QuantWeight):
            m.forward = partial(_float_layer, m, *floats[m])
        else:
            m.forward = nn.Identity().forward


def _float_layer(qw: QuantWeight, weight: Tensor, bias: Tensor, x: Tensor) -> Tensor:
    return layer_forward(qw.layer, x, weight, bias)


def _float_parts(qw: QuantWeight) -> tuple[Tensor, Tensor]:
    return qw.layer.weight.detach(), qw.uncorrected_bias()


def _kl(ref: Tensor, model: nn.Module, x: Tensor) -> float:
    """Mean over the images of KL(float || model)."""
    return float(F.kl_div(log_probs(model, x), ref, log_target=True, reduction="batchmean"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--act-bits", type=int, default=8)
    p.add_argument("--top", type=int, default=12, help="layers and quantizers listed, the largest KL first")
    p.add_argument("--start", action="store_true", help="the layer-local start's rounding instead of RTN")
    p.add_argument("--start-sweeps", type=int, default=0, help="with --start: coordinate descent passes")
    p.add_argument("--load", default=None, help="a quantized model fxq.save wrote (at --bits, --act-bits) instead")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    lm = load_model(args.model)
    calib_dir, val_dir = default_image_sets(args.model)
    calib = load_images(calib_dir, lm.preprocess, progress=False)
    val = load_images(val_dir, lm.preprocess, labeled=True, progress=False)
    rtn_config = PTQConfig(target=INT8.with_bits(args.bits, args.act_bits), method=Method.RTN, progress=False)
    rtn, _ = fxq.quantize(lm.model, batches(calib.x, 32), rtn_config)
    if args.load:
        method_name, qgm = f"from {args.load}", fxq.load(args.load).model
    elif args.start:  # the layer-local start alone, kept whatever the keep-best check would say
        rounding = RoundingConfig(iterations=0, start="layerwise", start_sweeps=args.start_sweeps, keep_best=False)
        start_config = replace(rtn_config, method=Method.EPTQ, rounding=rounding)
        method_name, qgm = "the layer-local start", fxq.quantize(lm.model, batches(calib.x, 32), start_config)[0]
    else:
        method_name, qgm = "RTN", rtn
    weights = {n: m for n, m in qgm.named_modules() if isinstance(m, QuantWeight)}
    # the float weights and biases from RTN's graph: a rounding writes its grid values and its bias over a layer's,
    # RTN keeps the weight and the float bias (its layer's own is corrected for the quantized weight)
    floats = {m: _float_parts(rtn.get_submodule(n)) for n, m in weights.items()}
    acts = {n: m for n, m in qgm.named_modules() if isinstance(m, ActQuant)}
    ref_val = log_probs(lm.model, val.x)
    width = f"W{args.bits}A{args.act_bits}"
    out = next(n for n in qgm.graph.nodes if n.op == "output").args[0]
    logits = [acts[out.target]] if out.op == "call_module" and out.target in acts else []  # the output's quantizer
    variants = {
        "float (the model as given)": None,
        "float, the traced graph (BN folded)": [*weights.values(), *acts.values()],
        f"W{args.bits} weights alone": list(acts.values()),
        f"A{args.act_bits} activations alone": list(weights.values()),
        f"{width} {method_name}": [],
        f"{width} {method_name}, the output left float": logits,
    }
    report = {"setting": {"model": args.model, "width": width, "val": len(val)}, "variants": {}}
    print(f"{args.model}, {len(val)} val images; KL: mean KL(float || quantized) per image")
    for name, in_float in variants.items():
        model = lm.model if in_float is None else qgm
        _in_float_(in_float or [], True, floats)
        row = evaluate(model, val.x, val.y, progress=False, reference=ref_val)
        _in_float_(in_float or [], False, floats)
        report["variants"][name] = row
        print(
            f"{name:<42} top-1 {row['top1']:6.2f} ({row['correct1']})  agrees {row['agreement']:.2%}  KL {row['kl']:.5f}"
        )

    probe = calib.x[-128:]
    ref = log_probs(lm.model, probe)
    everything = [*weights.values(), *acts.values()]
    for kind, parts in (("layer", weights), ("activation quantizer", acts)):
        kls = {}
        for name, m in parts.items():
            _in_float_([x for x in everything if x is not m], True, floats)
            kls[name] = _kl(ref, qgm, probe)
            _in_float_(everything, False, floats)
        report[kind] = kls
        print(f"\neach {kind} alone quantized (KL on {len(probe)} calibration images; sum {sum(kls.values()):.5f})")
        for name in sorted(kls, key=kls.get, reverse=True)[: args.top]:
            print(f"  {name:<48} {kls[name]:.5f}")
    if args.json:
        write_json_atomic(args.json, report)


if __name__ == "__main__":
    main()
