#!/usr/bin/env bash
# Run ON the device machine, from the repo root, after tools/device/fetch-wheels.sh here:
#   run(command="bash tools/device/bench-gpu.sh", carry=[".whl"], timeout_s=540)
# Issue #4's GPU benchmark: a Stable-Diffusion-1.5-sized U-Net (random weights) at 512x512, 25
# steps; ldmq's worker path against diffusers' fp16 pipeline, and the fraction of the bf16 peak
# measured in the same run. Each figure lands in $OUT as JSON plus one log. Steps are ordered by
# value and each has its own time limit, so a slow one costs only itself.
set -uo pipefail
OUT=${OUT:-/tmp/ldmq-gpu-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/bench-gpu.log") 2>&1

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c 'import torch, diffusers, transformers; print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())'

step() {  # step NAME LIMIT_S ARGS...: one bench configuration, its JSON in $OUT/NAME.json
  local name=$1 limit=$2
  shift 2
  echo "== $name ($*)"
  SECONDS=0
  timeout "$limit" python3 -m ldmq.bench.gpu --json "$OUT/$name.json" "$@" || echo "!! $name failed or ran past ${limit}s"
  echo "== $name took ${SECONDS}s"
}

# 1. the code path on CUDA in seconds (tiny model), with the batch found from free memory
step smoke 90 --smoke --batch-size 0 --batches 2 --steps 5
# 2. the figure: bf16, the default batch of 16 (4 batches of 16 images, each timed run)
step sd15-bf16 200
# 3. channels_last, and the batch the worker would pick from free memory
step sd15-bf16-cl-auto 240 --channels-last --batch-size 0 --batches 1
ls -la "$OUT"
