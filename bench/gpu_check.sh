#!/usr/bin/env bash
# The GPU measurements of issue 15 in one run, most important first (docs/performance.md).
#
#   bash bench/gpu_check.sh              on the GPU machine; 7-9 minutes on an H100 (capped at 9)
#   bash bench/gpu_check.sh --quick      dry run on a CPU: --device cpu, width 1/16, 256-image epochs, and
#                                        torch.compile made a no-op (TORCH_COMPILE_DISABLE=1), so every
#                                        Python part runs end to end (8 minutes on a shared 2-core CPU)
#   bash bench/gpu_check.sh e2e vit_b_4  only the named steps (a rerun of the ones that failed)
#
# Steps: env, tests, resnet18, wrn40_10, vit_b_4 (eager, eager without channels_last, and the default
# path, compile-reduce-overhead: epoch time, img/s, FLOPs, MFU, compile time, the NC pass at C = 100,
# a profile of the default path when under 35 % MFU), e2e (main.py with its default --compile, then
# --resume), then, while the budget lasts: compile-default, torchrun-cpu, autotune. Each step has
# its own time limit, and a failing step does not stop the others. Files in $OUT: gpu_check.log
# (everything), results.jsonl (one record per model and path), summary.txt (printed last too).
# GPU_CHECK_BUDGET_S (default 430) bounds when optional steps start; GPU_CHECK_HARD_S (default
# 530) caps every step's limit, so the whole script ends within 9 minutes, summary included.
set -uo pipefail
cd "$(dirname "$0")/.."
SELF=bench/gpu_check.sh

QUICK=0
STEPS=()
for arg in "$@"; do
  case $arg in
    --quick) QUICK=1 ;;
    __step) ;;
    *) STEPS+=("$arg") ;;
  esac
done

export OUT=${OUT:-/tmp/gpu_check}
export PYTHONUNBUFFERED=1
export PY=${PYTHON:-python3}
export RUNS=${GPU_CHECK_RUNS:-/tmp/gpu_check_runs}
export RESULTS=$OUT/results.jsonl
if [ "$QUICK" = 1 ]; then
  export DEV=cpu WIDTH=0.0625 NUM_TRAIN=256 BATCH=64 EPOCHS=1 COMPILE_FLAG=--compile TORCH_COMPILE_DISABLE=1
  # a shared 2-core CPU runs these steps 5-10 times slower than the GPU machine
  LIMIT_SCALE=${GPU_CHECK_LIMIT_SCALE:-8}; BUDGET_S=${GPU_CHECK_BUDGET_S:-7200}; HARD_S=${GPU_CHECK_HARD_S:-9000}
else
  # 10,000-image epochs (78 steps of 128), scaled to 50,000 in the tables; main.py's own default
  # (compile on CUDA) is what e2e checks, so it passes no --compile.
  export DEV=cuda WIDTH=1 NUM_TRAIN=10000 BATCH=128 EPOCHS=3 COMPILE_FLAG=
  LIMIT_SCALE=1; BUDGET_S=${GPU_CHECK_BUDGET_S:-430}; HARD_S=${GPU_CHECK_HARD_S:-530}
fi
export BENCH_ARGS="--dataset cifar100 --device $DEV --width $WIDTH --num-train $NUM_TRAIN --batch-size $BATCH \
--epochs $EPOCHS --data-dir ./no-real-data --json $RESULTS"

# ------------------------------------------------------------------ step bodies (run in a child bash)
keep_stderr() {  # keep_stderr FILE COMMAND...: run it with its stderr saved to FILE and shown
  local file=$1; shift
  "$@" 2> "$file"; local code=$?
  cat "$file" >&2
  return $code
}

step_body() {
  case $1 in
    env)
      if [ "$DEV" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; fi
      $PY - <<'EOF'
import os, platform, torch, torchvision
from bench.flops import peak_bf16_tflops
name = torch.cuda.get_device_name() if os.environ["DEV"] == "cuda" else platform.processor() or "cpu"
print(f"python {platform.python_version()} | torch {torch.__version__} | torchvision {torchvision.__version__} | "
      f"device {name} | peak row {peak_bf16_tflops(name) if os.environ['DEV'] == 'cuda' else None} | "
      f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, cudnn {torch.backends.cudnn.allow_tf32}")
EOF
      ;;
    tests)
      # the CUDA-only tests: NC statistics on the GPU equal the CPU's; the default training path's dtype and layout;
      # the UFM fit and CutMix with tensors on the GPU (they kill mutation_accepted.txt's device-only mutants)
      $PY -m pytest -q -p no:cacheprovider tests/test_collapse_metrics.py tests/test_speed_paths.py tests/test_ufm.py \
        tests/test_cutmix.py -k "cuda or gpu" ;;
    e2e)
      # main.py's default on this device (compile on CUDA), a few epochs on digits, then --resume
      local common=(--dataset digits --model resnet18 --width 0.25 --device "$DEV" --no-progress --out-dir "$RUNS"
                    --run-name e2e $COMPILE_FLAG)
      keep_stderr "$RUNS.first.err" $PY main.py "${common[@]}" --epochs 2 --overwrite || return 1
      keep_stderr "$RUNS.resume.err" $PY main.py "${common[@]}" --epochs 3 --resume || return 1
      if grep -h "warning: torch.compile" "$RUNS.first.err" "$RUNS.resume.err"; then
        echo "e2e: compilation fell back to eager (warning above)"; return 1
      fi
      $PY - <<'EOF'
import os, pickle
with open(os.path.join(os.environ["RUNS"], "e2e", "metrics.pkl"), "rb") as handle:
    document = pickle.load(handle)
epochs = [record["epoch"] for record in document["epochs"]]
print(f"e2e: status {document['status']}, epochs {epochs}, compile {document['config']['compile']} "
      f"({document['config']['compile_mode']}), epoch seconds {[round(r['time_s'], 2) for r in document['epochs']]}")
assert document["status"] == "complete" and epochs == [0, 1, 2, 3] and document["config"]["compile"] is True
EOF
      ;;
    resnet18|wrn40_10|vit_b_4)
      # eager first (the baseline; channels_last off for the conv nets), then main.py's default path on
      # CUDA, profiled if under 35 % MFU: eager paths before the compiled one, so a compiler hang loses none
      $PY bench/throughput.py --models "$1" --paths eager,eager-nchw,compile-reduce-overhead \
        --profile-below 0.35 --profile-paths compile-reduce-overhead \
        $( [ "$1" = resnet18 ] && echo --check-syncs ) $BENCH_ARGS ;;
    layer-memory)
      # issue 14: extra time and memory of --nc-layers all in the measurement pass, ResNet-18 at N = 50,000
      $PY bench/layer_memory.py --model resnet18 --device "$DEV" --width "$WIDTH" \
        --num-train $( [ "$QUICK" = 1 ] && echo 512 || echo 50000 ) ;;
    e2e-manifold)
      # manifold mixup through main.py's default (compiled) training step, then --resume
      local manifold=(--dataset digits --model resnet18 --width 0.25 --device "$DEV" --no-progress --out-dir "$RUNS"
                      --run-name manifold --mixup-layer random --nc-layers all $COMPILE_FLAG)
      keep_stderr "$RUNS.manifold.err" $PY main.py "${manifold[@]}" --epochs 2 --overwrite || return 1
      keep_stderr "$RUNS.manifold2.err" $PY main.py "${manifold[@]}" --epochs 3 --resume || return 1
      if grep -h "warning: torch.compile" "$RUNS.manifold.err" "$RUNS.manifold2.err"; then
        echo "e2e-manifold: compilation fell back to eager (warning above)"; return 1
      fi ;;
    compile-default)
      # compile without CUDA graphs: tells whether reduce-overhead's graphs pay for ResNet-18
      $PY bench/throughput.py --models resnet18 --paths compile-default --no-nc $BENCH_ARGS ;;
    torchrun-cpu)
      # --compile under torchrun: two processes, gloo, DDP's graph splitting, inductor's C++ backend
      keep_stderr "$RUNS.ddp.err" $PY -m torch.distributed.run --nproc_per_node=2 --standalone main.py \
        --dataset digits --model mlp --width 0.25 --epochs 2 --device cpu --compile --compile-mode default \
        --no-progress --out-dir "$RUNS" --run-name ddp --overwrite || return 1
      if grep -h "warning: torch.compile" "$RUNS.ddp.err"; then echo "torchrun: compilation fell back to eager"; return 1; fi ;;
    autotune)
      $PY bench/throughput.py --models vit_b_4 --paths compile-max-autotune-no-cudagraphs --no-nc $BENCH_ARGS ;;
    *) echo "unknown step $1"; return 2 ;;
  esac
}

if [ "${1:-}" = __step ]; then  # the child: one step's body
  step_body "${STEPS[0]}"
  exit $?
fi

# ------------------------------------------------------------------ the parent: order, limits, budget
mkdir -p "$OUT" "$RUNS"
LOG=$OUT/gpu_check.log
SUMMARY=$OUT/summary.txt
[ ${#STEPS[@]} -eq 0 ] && : > "$RESULTS"  # a rerun of named steps adds to the records
STATUS=()

wanted() {  # no step names given: every step; else only those named
  [ ${#STEPS[@]} -eq 0 ] && return 0
  local s; for s in "${STEPS[@]}"; do [ "$s" = "$1" ] && return 0; done
  return 1
}

run_step() {  # run_step NAME LIMIT_S [MIN_BUDGET_S]: MIN_BUDGET_S makes it optional
  local name=$1 limit=$(($2 * LIMIT_SCALE)) min_budget=${3:+$(($3 * LIMIT_SCALE))}
  wanted "$name" || return 0
  local left=$((HARD_S - 10 - SECONDS))
  if [ -n "$min_budget" ] && [ $((BUDGET_S - SECONDS)) -lt "$min_budget" ]; then
    STATUS+=("$name: skipped (needs ${min_budget}s of budget, $((BUDGET_S - SECONDS))s left)")
    echo "=== $name skipped: budget" | tee -a "$LOG"; return 0
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -le 0 ]; then STATUS+=("$name: skipped (hard limit reached)"); return 0; fi
  echo "=== $name (limit ${limit}s, at ${SECONDS}s)" | tee -a "$LOG"
  local start=$SECONDS
  timeout -k 10 "$limit" bash "$SELF" __step "$name" $( [ "$QUICK" = 1 ] && echo --quick ) 2>&1 | tee -a "$LOG"
  local code=${PIPESTATUS[0]} took=$((SECONDS - start))
  local verdict=ok; [ "$code" = 124 ] && verdict="TIMED OUT"; [ "$code" != 0 ] && [ "$code" != 124 ] && verdict="FAILED (exit $code)"
  STATUS+=("$name: $verdict after ${took}s")
  echo "=== $name: $verdict after ${took}s" | tee -a "$LOG"
}

# Limits assume an H100 and a cold compile cache: torch.compile of each network takes 40-120 s.
# The three networks first (the issue's figures; their compiled paths go through main.py's build_run and
# the eager fallback, which they would report), then main.py's own default and --resume end to end.
run_step env 30
run_step tests 60
run_step resnet18 150
run_step layer-memory 60
run_step wrn40_10 200
run_step vit_b_4 200
run_step e2e 150
run_step e2e-manifold 100 100
run_step compile-default 120 120
run_step torchrun-cpu 90 90
# max-autotune benchmarks every GEMM's candidate kernels: many minutes for a whole network, so it
# runs only when a rerun grants the budget (GPU_CHECK_BUDGET_S=900 bash bench/gpu_check.sh autotune)
run_step autotune 500 500

{
  echo "=== summary ($(date -u +%FT%TZ), ${SECONDS}s)"
  printf '%s\n' "${STATUS[@]}"
  echo
  if [ -s "$RESULTS" ]; then $PY bench/report.py "$RESULTS"; else echo "no bench results"; fi
} 2>&1 | tee "$SUMMARY" | tee -a "$LOG"
