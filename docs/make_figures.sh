#!/usr/bin/env bash
# Regenerates, from scratch, every figure and table that README.md shows:
#   1. trains the runs they need into a scratch folder (nothing under runs/ is touched),
#   2. draws the figures into docs/ with utils.py, as the README's commands do,
#   3. prints every number the README quotes (the default-run table, the summary table,
#      the representations numbers), ready to paste.
# On the project's 2-core CPU machine it takes a few minutes; the numbers in README.md
# come from it. Their last digits differ between CPU models (the order of float
# summation differs), and wall times vary with the machine's load.
#
#   bash docs/make_figures.sh [SCRATCH_FOLDER]    # default: a new folder under /tmp, kept
#
# Each section below is independent of the ones after it; add a new figure as a new
# section before "Done". The script stops at the first command that fails.
set -euo pipefail
shopt -s inherit_errexit  # a failure inside $(...) stops the script too
cd "$(dirname "$0")/.."

SCRATCH=${1:-$(mktemp -d /tmp/make_figures.XXXXXX)}
RUNS=$SCRATCH/runs
SWEEP=$RUNS/loss_sweep
LOGS=$SCRATCH/logs
DOCS=docs
DPI=100  # with the palette reduction below, keeps each README image small
mkdir -p "$RUNS" "$LOGS"
if [ -n "$(ls -A "$RUNS")" ]; then
    echo "make_figures.sh: $RUNS is not empty; give a new scratch folder" >&2
    exit 1
fi
SCRIPT_START=$(date +%s.%N)

# ------------------------------------------------------------------ helpers

# seconds since $1 (a `date +%s.%N` stamp), one decimal
seconds_since() { awk -v start="$1" -v now="$(date +%s.%N)" 'BEGIN { printf "%.1f", now - start }'; }

# main.py with its output in $LOGS/<name>.log; prints the wall time, start to finish
train() {
    local name=$1; shift
    local start; start=$(date +%s.%N)
    if ! python main.py "$@" > "$LOGS/$name.log" 2>&1; then
        tail -n 5 "$LOGS/$name.log" >&2
        echo "make_figures.sh: training $name failed (log: $LOGS/$name.log)" >&2
        return 1
    fi
    echo "trained $name in $(seconds_since "$start") s (log: $LOGS/$name.log)" >&2
    seconds_since "$start"
}

# Reduces PNGs to a 256-colour palette (no dithering: flat colours stay flat), in place.
shrink_png() {
    python - "$@" <<'PYTHON'
import os, sys
from PIL import Image
for path in sys.argv[1:]:
    before = os.path.getsize(path)
    Image.open(path).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                             dither=Image.Dither.NONE).save(path, optimize=True)
    print(f"{path}: {before // 1024} KB -> {os.path.getsize(path) // 1024} KB (256 colours)")
PYTHON
}

# utils.py writing docs/<file>.png at $DPI, then shrunk
figure() {
    local file=$1; shift
    python utils.py "$@" --out "$DOCS/$file" --dpi "$DPI" > /dev/null
    shrink_png "$DOCS/$file"
}

echo "== machine"
echo "$(nproc) CPU cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
python -c "import platform, torch, numpy, matplotlib; print(f'python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}, matplotlib {matplotlib.__version__}')"
echo "scratch folder: $SCRATCH"

# ------------------------------------------------------------------ 1. runs
# The README's loss sweep: four default digits runs, two losses by two seeds. Its
# cross_entropy_s0 run is the default run (`python main.py`: cross-entropy, seed 0),
# so its wall time is the "with mixup" column of the default-run table.
echo "== training (5 runs of 100 epochs)"
for loss in cross_entropy mse; do for seed in 0 1; do
    time_s=$(train "${loss}_s${seed}" --out-dir "$SWEEP" --run-name "${loss}_s${seed}" --loss "$loss" --seed "$seed")
    if [ "$loss" = cross_entropy ] && [ "$seed" = 0 ]; then WALL_MIXUP=$time_s; fi
done; done
# The default run without mixup, for the table's second column.
WALL_NO_MIXUP=$(train no_mixup --out-dir "$RUNS" --run-name no_mixup --mixup-alpha 0)

# ------------------------------------------------------------------ 2. the default-run table
echo "== README, The default run (wall times from this machine, at its current load)"
python - "$SWEEP/cross_entropy_s0" "$RUNS/no_mixup" "$WALL_MIXUP" "$WALL_NO_MIXUP" <<'PYTHON'
import sys
from plotting.loading import load_run
with_mixup, without = load_run(sys.argv[1]), load_run(sys.argv[2])
runs, walls = (with_mixup, without), sys.argv[3:5]
def nc1(run, record):
    return record["nc"]["train"]["nc1"]
def cells(row):
    return "| " + " | ".join(row) + " |"
print(cells(["", "with mixup (`python main.py`)", "without (`--mixup-alpha 0`)"]))
print(cells(["---"] * 3))
print(cells(["wall time, start to finish"] + [f"{w} s" for w in walls]))
print(cells(["final training accuracy"] + [f"{100 * r.records[-1]['train_acc']:.3g} %" for r in runs]))
print(cells(["test accuracy"] + [f"{100 * r.records[-1]['test_acc']:.2f} %" for r in runs]))
first, last = (nc1(r, r.records[0]) for r in runs), (nc1(r, r.records[-1]) for r in runs)
nc1_cells = [f"{a:.3g} → {b:.3g} ({a / b:.3g}x)" for a, b in zip(first, last)]
print(cells([f"NC1 (train) at epoch 0 → epoch {with_mixup.last_epoch()}"] + nc1_cells))
PYTHON

# ------------------------------------------------------------------ 3. curves, nc, calibration, compare
echo "== figures"
figure curves.png curves "$SWEEP" --error
figure nc.png nc "$SWEEP"
figure calibration.png calibration "$SWEEP/cross_entropy_s0" "$SWEEP/mse_s0"
figure compare.png compare "$SWEEP" --by loss --band std \
    --metric test_err,train_err,nc1,nc2_etf_h,nc3,same_class_alignment

# ------------------------------------------------------------------ 4. representations: triangle, means, cosines
figure representations.png representations "$SWEEP/cross_entropy_s0" "$SWEEP/mse_s0" --epochs 1,7,100 --samples
figure representations_means.png representations "$SWEEP/cross_entropy_s0" "$SWEEP/mse_s0" \
    --epochs 1,7,100 --view means
figure representations_cosines.png representations "$SWEEP/cross_entropy_s0" "$SWEEP/mse_s0" \
    --epochs 1,7,100 --view cosines

# ------------------------------------------------------------------ 5. the summary table
echo "== README, summary (python utils.py summary runs/loss_sweep)"
python utils.py summary "$SWEEP"

# ------------------------------------------------------------------ 6. the representations numbers
echo "== README, representations (seed 0 at epoch 100: mixup geometry, NC1, and mean |cos + 1/(C-1)| of H and W)"
python utils.py summary "$SWEEP/cross_entropy_s0" "$SWEEP/mse_s0" \
    --metric same_class_alignment,diff_class_nonlinearity,nc1,nc2_maxangle_h,nc2_maxangle_w

# ------------------------------------------------------------------ add new sections above this line

# ------------------------------------------------------------------ done
echo "== done in $(seconds_since "$SCRIPT_START") s; runs and logs kept in $SCRATCH"
