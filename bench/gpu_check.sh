#!/usr/bin/env bash
# Every GPU check of this project in one run, most important first (see README "Performance").
# Through the device tool:  bash bench/gpu_check.sh   (figures go to $OUT/gpu_check.log)
# Each step has its own time limit, so one slow step cannot take the others down with it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
RUNS=/tmp/gpu_check_runs
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

step() {
  local limit=$1; shift
  echo "=== $* (limit ${limit}s)" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "=== exit ${PIPESTATUS[0]} after $((SECONDS - start))s" | tee -a "$LOG"
}

step 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step 60 $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"
# NC metrics on the GPU equal the CPU's; a real run end to end on the GPU.
step 120 $PY -m pytest -q -x -p no:cacheprovider tests/test_collapse_metrics.py tests/test_main.py
# Issue 6's targets: ResNet-18 on CIFAR-10-shaped data, 50,000 images, batch 128; no host syncs per step.
step 150 $PY bench/throughput.py --model resnet18 --dataset cifar10 --device cuda --epochs 2 --classic-steps 100 --check-syncs
# The 3-epoch main.py smoke run (progress bar on: exercises the lagged device read-out).
step 90 $PY main.py --dataset digits --model resnet18 --width 0.5 --epochs 3 --device cuda --progress \
  --out-dir "$RUNS" --run-name smoke --overwrite
step 180 $PY bench/throughput.py --model wrn28_10 --dataset cifar10 --device cuda --epochs 1 --classic-steps 40
# Seconds per epoch of the paper grid's models (10,000-image epochs, scaled up in the README).
for model in wrn40_10 vit_b_4; do
  for dataset in cifar10 fashionmnist; do
    step 120 $PY bench/throughput.py --model $model --dataset $dataset --device cuda --epochs 1 --num-train 10000 --no-classic
  done
done
# torch.compile with a fixed batch shape.
step 200 $PY bench/throughput.py --model resnet18 --dataset cifar10 --device cuda --epochs 2 --compile --compile-mode reduce-overhead --no-classic
echo "=== done" | tee -a "$LOG"
