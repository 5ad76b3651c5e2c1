#!/usr/bin/env bash
# Run a grid of main.py trainings on the GPUs of this machine: a thin wrapper around
# scripts/sweep.py (same flags; `bash scripts/sweep.sh --help` lists them).
#
#   bash scripts/sweep.sh --datasets cifar10,cifar100,fashionmnist --models wrn40_10,vit_b_4 \
#       --losses cross_entropy,mse,mae,smooth_l1,focal --alphas 0,1 --seeds 0,1,2 \
#       --out-dir runs -- --download
#   bash scripts/sweep.sh <same flags> --dry-run    # the plan: run / resume / skip, GPU, command
#
# - GPUs: every one in $CUDA_VISIBLE_DEVICES (or that PyTorch sees), one run per GPU at a
#   time; pick them with --gpus 0,1,2, pack several runs per GPU with --jobs N, or use
#   --gpus cpu --jobs N on a machine without a GPU.
# - Flags after `--` go to every main.py run.
# - Each run writes <out-dir>/<run name>/ with its stdout.log and stderr.log.
# - Interrupted (Ctrl-C, kill, closed terminal, reboot)? Run the same command again:
#   complete runs are skipped, the others resume from their last checkpoint.
# - Exit status: 0 all runs complete, 1 some failed (listed), 2 bad flags, 128+N on signal N.
#
# Environment: PYTHON, the interpreter (default: python on PATH, e.g. the active venv's, else python3).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
exec "$PYTHON" "$HERE/sweep.py" "$@"
