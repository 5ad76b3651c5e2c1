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
    --metric train.nc1,test_acc,diff_class_nonlinearity,cutmix.diff_class_nonlinearity,diff_class_chord_nonlinearity,\
cutmix.diff_class_chord_nonlinearity,ufm_shape_residual,cutmix.ufm_shape_residual
# docs/cutmix_representations.png: seed 0's CutMix points (cross-entropy), mixup-trained above, CutMix-trained below
"$python" utils.py representations "$out"/digits_mlp_cross_entropy_a1_s0_* "$out"/digits_mlp_cross_entropy_a0_cut1_s0_* \
    --mix cutmix --theory --epochs last --dpi 80 --out docs/cutmix_representations.png
"$python" -c 'from plotting.style import shrink_png; shrink_png("docs/cutmix_representations.png")'  # 256 colours
