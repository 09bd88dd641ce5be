#!/bin/bash
# The full EPTQ schedule on a lent GPU, time-boxed to fit one call: EfficientNet-Lite0 W4A8, 20K steps of 32 on all
# 1000 calibration images (the target: within 1.5 points of float, the whole run under 10 minutes on an
# H100), RTN W4A8 beside it, top-1 on the 650 val images. Prepare with `bash bench/gpu_prepare.sh full`, then
# run(command="bash bench/gpu_full.sh", carry=[".gpu"], timeout_s=595). FXQ_AMP=off turns bf16 autocast off
# (bench/rounding_step.py on the same GPU says which is faster). Results: $OUT/rounding_full.json (each row written
# when done), $OUT/full.log (the progress bar, so a cut run still shows its rate).
set -o pipefail
source bench/gpu_env.sh  # sets $out and $src, and leaves us in an empty folder
start=$(date +%s)
n=${FXQ_FULL_ITERATIONS:-20000}  # fewer only to try the script out on a CPU
timeout 560 python3 "$src/bench/rounding.py" --iterations "$n" --batch-size 32 --amp "${FXQ_AMP:-auto}" \
  --only "^(RTN W4A8|EPTQ W4A8 \\($n steps)" --json "$out/rounding_full.json" > "$out/full.log" 2>&1
echo "rc $? after $(( $(date +%s) - start )) s" | tee -a "$out/full.log"
tail -c 3000 "$out/full.log" | tr '\r' '\n' | tail -8
