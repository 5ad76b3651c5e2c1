#!/usr/bin/env bash
# The study at laptop scale: does neural collapse under mixup depend on the loss and the architecture?
# Trains on the bundled digits, on the CPU, every combination of
#   losses cross_entropy, mse, mae, smooth_l1, focal  x  mixup_alpha 0, 1  x  3 seeds
# for two architectures (the default MLP, and a ResNet-18 at 1/8 width), 60 runs, two at a time,
# then writes two reports with utils.py report: losses compared within each architecture (REPORT_DIR)
# and the architectures compared within each loss (REPORT_DIR/by_model, without figures).
#
#   bash scripts/digits_study.sh                       # runs in runs/digits_study, report in docs/study
#   bash scripts/digits_study.sh RUNS_DIR REPORT_DIR
#
# Rerunning it skips complete runs and resumes the others (scripts/sweep.py), then rewrites the report.
# It prints its wall time at the end. Environment: PYTHON, the interpreter (default: python on PATH).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE/.."
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
RUNS="${1:-runs/digits_study}"
REPORT="${2:-docs/study}"
GRID=(--datasets digits --losses cross_entropy,mse,mae,smooth_l1,focal --alphas 0,1 --seeds 0,1,2
      --out-dir "$RUNS" --gpus cpu --jobs 2)
EPOCHS=50        # every run the same protocol: the report refuses runs that differ in anything but the grid
CONV_WIDTH=0.125 # ResNet-18 channels x 1/8: a run takes about as long as three MLP runs
# The descriptors compared (all are tabulated): fewer tests make a smaller Holm family, hence more power.
METRICS=nc1_train,nc1_test,collapse_rate,test_acc

start=$(date +%s)
"$PYTHON" scripts/sweep.py "${GRID[@]}" --models mlp -- --epochs "$EPOCHS"
"$PYTHON" scripts/sweep.py "${GRID[@]}" --models resnet18 -- --epochs "$EPOCHS" --width "$CONV_WIDTH"
"$PYTHON" utils.py report "$RUNS" --factor loss --metrics "$METRICS" --out "$REPORT"
"$PYTHON" utils.py report "$RUNS" --factor model --metrics "$METRICS" --no-figures --out "$REPORT/by_model"
echo "digits study: $(( $(date +%s) - start )) s wall time on $(nproc) cores"
