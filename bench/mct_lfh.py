"""MCT's Hessian-trace scores (its EPTQ path) on EfficientNet-Lite0, for bench/lfh.py's side-by-side.

Run with a virtual environment that has model-compression-toolkit (bench only, never an fxq dependency):

    .bench-venv/bin/python bench/mct_lfh.py --images 32 --probes 10 --json FILE

It uses the anchors' helpers (../shared/anchors/mct/common.py: same preprocessing, the same-padding conv
workaround MCT needs), runs MCT's GPTQ facade with Hessian weights on `--images` calibration images, times
HessianInfoService.fetch_hessian, saves the per-layer scores and stops before any training step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

ANCHORS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "anchors", "mct")
sys.path.insert(0, ANCHORS)


class _Stop(Exception):
    pass


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--probes", type=int, default=10)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    os.environ.setdefault("MCT_OUT", "/tmp/mct-out")
    import common  # noqa: E402  (the anchors' helpers)
    import model_compression_toolkit as mct
    from model_compression_toolkit.core.common.hessian import hessian_info_service as his_mod
    from model_compression_toolkit.gptq.pytorch.gptq_training import PytorchGPTQTrainer

    found: dict = {}
    hsi = his_mod.HessianInfoService
    orig_init, orig_fetch = hsi.__init__, hsi.fetch_hessian

    def init(self, graph, fw_impl, num_iterations_for_approximation=None):
        orig_init(self, graph, fw_impl, num_iterations_for_approximation=args.probes)

    def fetch(self, request, *a, **k):
        t0 = time.perf_counter()
        r = orig_fetch(self, request, *a, **k)
        found["seconds"] = found.get("seconds", 0.0) + time.perf_counter() - t0
        found["scores"] = {str(name): float(np.mean(v)) for name, v in r.items()}
        return r

    def stop(self, n_epochs):
        raise _Stop

    hsi.__init__, hsi.fetch_hessian = init, fetch
    PytorchGPTQTrainer.micro_training_loop = stop
    calib = common.get_calib()[: args.images]
    model, _ = common.prepare_model_for_mct()
    gcfg = mct.gptq.get_pytorch_gptq_config(
        n_epochs=1, use_hessian_based_weights=True, use_hessian_sample_attention=False
    )
    gcfg.hessian_weights_config.hessians_num_samples = args.images
    t0 = time.perf_counter()
    try:
        mct.gptq.pytorch_gradient_post_training_quantization(
            model,
            common.make_repr_gen(calib, 32, args.images),
            gptq_config=gcfg,
            target_platform_capabilities=common.make_tpc(4),
        )
    except _Stop:
        pass
    found.update(
        total_seconds=time.perf_counter() - t0,
        images=args.images,
        probes=args.probes,
        threads=torch.get_num_threads(),
        mct=mct.__version__,
    )
    print(
        f"MCT {mct.__version__}: Hessian {found['seconds']:.1f} s for {args.probes} probes x {args.images} images, "
        f"{len(found['scores'])} layers (whole call until training {found['total_seconds']:.1f} s)"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(found, fh, indent=2)


if __name__ == "__main__":
    main()
