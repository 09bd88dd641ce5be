#!/bin/bash
# One lent-GPU session, every step time-boxed; results land in $OUT (JSON + logs). Prepare with bench/gpu_prepare.sh.
#   1. the CUDA tests (the fused LFH kernel against its reference, the LFH pass with the kernel, EPTQ from the CLI)
#   2. bench/lfh_kernel.py: fused kernel vs reference reduction over Lite0-like gradient lists (fp32, bf16)
#   3. bench/lfh.py: LFH of Lite0 (32 images, 100 probes) against its bound, probes per pass 1 and 8
#   4. bench/lfh_memory.py: the LFH's memory peak against one training step of the same batch
#   5. bench/rounding_step.py: time per rounding step at batch 32 against its bound: teacher cache on and off, bf16
#      autocast on and off, eager and torch.compile
#   6. EPTQ W4A8 at MCT's GPU setting (1008 steps, batch 32, first 500 calib images) with top-1 on 650 val
set -o pipefail
source bench/gpu_env.sh  # sets $out and $src, and leaves us in an empty folder
# a copy of the tests: run from $src/tests, pytest would put $src on sys.path and import its fxq/, which lacks
# fxq.passes and fxq.kernels (package-dir mappings that only the installed package has)
cp -r "$src/tests" "$src/pyproject.toml" .
FXQ_LFH_KERNEL=cuda timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_lfh_kernel.py tests/test_lfh.py \
  tests/test_cli.py::test_eptq_quantize_runs_on_the_gpu_with_the_full_schedule_by_default -m "not slow" 2>&1 \
  | tail -15 | tee "$out/tests.log"
for dt in float32 bfloat16; do
  timeout 60 python3 "$src/bench/lfh_kernel.py" --dtype $dt --json "$out/lfh_kernel_$dt.json" 2>&1 | tail -3
done
for ppp in 1 8; do
  timeout 90 python3 "$src/bench/lfh.py" --images 32 --probes 100 --probes-per-pass $ppp --seeds 0 \
    --json "$out/lfh_gpu_ppp$ppp.json" 2>&1 | tail -4 | tee -a "$out/lfh.log"
done
timeout 60 python3 "$src/bench/lfh_memory.py" --json "$out/lfh_memory_gpu.json" 2>&1 | tail -3
timeout 150 python3 "$src/bench/rounding_step.py" --batch-sizes 32 --steps 50 --cache on,off --amp auto,off \
  --json "$out/rounding_step_gpu.json" 2>&1 | tail -3 | tee -a "$out/rounding.log"
timeout 150 python3 "$src/bench/rounding_step.py" --batch-sizes 32 --steps 100 --cache on --amp auto,off --compile on \
  --json "$out/rounding_step_gpu_compiled.json" 2>&1 | tail -3 | tee -a "$out/rounding.log"
timeout 240 python3 "$src/bench/rounding.py" --only "MCT GPU" --json "$out/rounding_gpu.json" --quiet 2>&1 | tail -5 \
  | tee -a "$out/rounding.log"
