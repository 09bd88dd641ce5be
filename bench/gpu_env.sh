# Sourced by bench/gpu_session.sh and bench/gpu_full.sh on a lent GPU machine: installs the carried wheels (fxq's
# among them) into a temporary site, points fxq at the carried images, records the GPU, and sets $out and $src.
out=${OUT:-$(mktemp -d)}; site=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .gpu/wheels/*.whl || exit 3  # fxq too
export PYTHONPATH=$site FXQ_DATA=$PWD/.gpu/data PYTHONUNBUFFERED=1 FXQ_CACHE=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
src=$PWD
cd "$(mktemp -d)" || exit 3  # import the installed fxq, not the source tree
