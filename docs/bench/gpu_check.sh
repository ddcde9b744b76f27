#!/usr/bin/env bash
# The GPU checks in one prepared run (the `device` tool's machine, or any CUDA box):
#   1. the `gpu`-marked tests (exactness of every method on CUDA, a short fine-tune on CUDA);
#   2. `lance bench layers --device cuda` at batch 32, 64, 128, synthetic and real MCUNet-in3 layers;
#   3. a short real fine-tune of MCUNet-in3's last 4 layers on CUDA, every method.
#
# Usage: OUT=/some/dir GPU_SHARED=path/to/shared [GPU_WHEELS=dir] bash docs/bench/gpu_check.sh
#   GPU_SHARED: a folder laid out like ../shared (weights/mcunet-in3, datasets/cifar10-jpeg/train); a few
#     hundred images per class are enough. GPU_WHEELS: wheels of packages the machine lacks (platformdirs).
# Writes to $OUT: gpu.txt, pytest_gpu.log, layers_cuda.json, layers_real_cuda.json, finetune_cuda.json, *.log
# (docs/bench/layers-cuda-batch-sizes.json etc. are copies of those files).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to a folder for the results}
SHARED=${GPU_SHARED:-../shared}
if [ -n "${GPU_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$GPU_WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export LANCE_SHARED=$SHARED LANCE_WEIGHTS_DIR=$SHARED/weights
export LANCE_HOME=$(mktemp -d) LANCE_CACHE_DIR=$(mktemp -d)
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
    'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

step() {  # step NAME SECONDS CMD…: run with a time limit, log to $OUT/NAME.log, report rc and wall seconds
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s.%N)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name rc=$rc wall_s=$(python3 -c "print(round($(date +%s.%N) - $t0, 1))")"
  tail -n 25 "$OUT/$name.log"
}

step pytest_gpu 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
step layers_cuda 120 python3 -m engine bench layers --device cuda --batch-sizes 32,64,128 --repeats 15 \
  --json "$OUT/layers_cuda.json"
step layers_real_cuda 90 python3 -m engine bench layers --device cuda --batch-sizes 32,64,128 --repeats 15 --real \
  --json "$OUT/layers_real_cuda.json"
step finetune_cuda 120 python3 -m engine finetune --backbone mcunet-in3 \
  --dataset "imagefolder:$SHARED/datasets/cifar10-jpeg" --method vanilla,gradient_filter,hosvd,asi,lance --layers 4 \
  --eps hosvd=0.8 --budget 0.39MB --epochs 2 --limit-train 1000 --limit-val 300 --seed 0 --device cuda \
  --json "$OUT/finetune_cuda.json"
