#!/usr/bin/env bash
# The digits comparison of docs/cutmix.md: mixup against CutMix (both Beta(1, 1)), cross-entropy and MSE,
# seeds 0-2, on the CPU; every run measures the class-triple points of both rules at its last epoch.
#   scripts/cutmix_digits.sh [OUT_DIR]      (default runs/cutmix_digits; a rerun skips finished runs)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/cutmix_digits}
python=${PYTHON:-python}
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$python" scripts/sweep.py --losses cross_entropy,mse --rules mixup,cutmix \
    --seeds 0,1,2 --gpus cpu --jobs "${JOBS:-2}" --out-dir "$out" -- --feature-epochs 100 --feature-mix mixup,cutmix
"$python" utils.py summary "$out" --by loss,mix_rule \
    --metric train.nc1,test_acc,diff_class_nonlinearity,cutmix.diff_class_nonlinearity,ufm_residual,cutmix.ufm_residual
