#!/usr/bin/env bash
# Regenerates, from scratch, every figure and table that README.md and the manual (docs/*.md) show:
#   1. trains the runs they need into a scratch folder (nothing under runs/ is touched),
#   2. draws the figures into docs/ with utils.py, as the pages' commands do,
#   3. prints every number the pages quote, ready to paste, each under a header naming its page:
#      README.md (the default-run table), docs/figures.md (the summary table, the representations
#      numbers), docs/ufm.md (the residual table), docs/layers.md (the per-layer tables and the
#      cost of --nc-layers); docs/development.md lists where each goes.
# On the project's 2-core CPU machine it trains ten 100-epoch runs, then bench/ufm_claim.py's twelve:
# 362 s on the idle 2-core AMD EPYC machine (2026-12-07), about three times that on a busy one. The numbers in README.md and docs/*.md
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
ETF=$RUNS/etf            # the two losses with a fixed simplex-ETF classifier (UFM figure)
MANIFOLD=$RUNS/manifold  # the two losses with manifold mixup (layers figure)
LOGS=$SCRATCH/logs
DOCS=docs
DPI=100  # with the palette reduction below, keeps each image of the pages small
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
from plotting.style import shrink_png
for path in sys.argv[1:]:
    before = os.path.getsize(path)
    shrink_png(path)
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
# The default run (`python main.py`: cross-entropy, seed 0), as a user starts it: its wall
# time is the "with mixup" column of the default-run table.
echo "== training (10 runs of 100 epochs)"
WALL_MIXUP=$(train default --out-dir "$RUNS" --run-name default)
# The loss sweep of docs/figures.md: four default digits runs, two losses by two seeds, measured at
# every stage too (--nc-layers all adds measurements, not training: its cross_entropy_s0 is
# the default run, record for record, which section 7 checks).
for loss in cross_entropy mse; do for seed in 0 1; do
    time_s=$(train "${loss}_s${seed}" --out-dir "$SWEEP" --run-name "${loss}_s${seed}" --loss "$loss" --seed "$seed" \
        --nc-layers all)
    if [ "$loss" = cross_entropy ] && [ "$seed" = 0 ]; then WALL_NC_LAYERS=$time_s; fi
done; done
# The default run without mixup, for the table's second column.
WALL_NO_MIXUP=$(train no_mixup --out-dir "$RUNS" --run-name no_mixup --mixup-alpha 0)
# The UFM figure's fixed classifier: both losses with a simplex-ETF last layer (seed 0).
for loss in cross_entropy mse; do
    train "etf_$loss" --out-dir "$ETF" --run-name "$loss" --loss "$loss" --etf-classifier > /dev/null
done
# The layers figure's manifold mixup: Verma et al.'s recipe, a stage drawn per batch from
# the input and the first two stages (mlp: input, hidden1, hidden2), per-layer NC on.
for loss in cross_entropy mse; do
    train "manifold_$loss" --out-dir "$MANIFOLD" --run-name "$loss" --loss "$loss" --mixup-layer random \
        --nc-layers all > /dev/null
done

# ------------------------------------------------------------------ 2. the default-run table
echo "== README.md, The default run (wall times from this machine, at its current load)"
python - "$RUNS/default" "$RUNS/no_mixup" "$WALL_MIXUP" "$WALL_NO_MIXUP" <<'PYTHON'
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
echo "== docs/figures.md, summary (python utils.py summary runs/loss_sweep)"
python utils.py summary "$SWEEP"

# ------------------------------------------------------------------ 6. the representations numbers
echo "== docs/figures.md, representations (seed 0 at epoch 100: mixup geometry, NC1, and mean |cos + 1/(C-1)| of H and W)"
python utils.py summary "$SWEEP/cross_entropy_s0" "$SWEEP/mse_s0" \
    --metric same_class_alignment,diff_class_nonlinearity,nc1,nc2_maxangle_h,nc2_maxangle_w

# ------------------------------------------------------------------ 7. the UFM figure and residual table
echo "== figures: the mixup geometry against the UFM optimum"
# the residual table's epochs (the first and last feature epoch); eight panels of dense points
# stay under 150 KB at 85 dpi
DPI=85 figure representations_theory.png representations "$SWEEP/cross_entropy_s0" "$SWEEP/mse_s0" \
    "$ETF/cross_entropy" "$ETF/mse" --theory --epochs 1,100
echo "== docs/ufm.md, residual table (Mixup geometry against the UFM optimum: first and last feature epoch)"
# seed 1 of the learned classifier (another triple, too) shows how much the numbers move between seeds
python - "$SWEEP/cross_entropy_s0" "$SWEEP/cross_entropy_s1" "$ETF/cross_entropy" \
    "$SWEEP/mse_s0" "$SWEEP/mse_s1" "$ETF/mse" <<'PYTHON'
import math, sys
from plotting.loading import load_run
def cell(value, digits=2):
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"
def gamma(fit):
    if fit["nan_reason"]:
        return f"no fit: {fit['nan_reason']}"
    if not fit["identifiable"]:
        return "not identifiable"
    return f"{fit['gamma']:.3g}" + (" (end of range)" if fit["gamma_at_bound"] else "")
print("| loss | classifier | seed | epoch | residual | floor | shape | shape, ETF benchmark | same-class | "
      "different-class | outside share | gamma |")
print("|" + " --- |" * 12)
for folder in sys.argv[1:]:
    run = load_run(folder)
    geometries = [(r["epoch"], r["mixup_geometry"]) for r in run.records if r.get("mixup_geometry")]
    classifier = "fixed ETF" if run.config["etf_classifier"] else "learned"
    for epoch, geometry in (geometries[0], geometries[-1]):
        fit, etf = geometry["ufm"], geometry["ufm_etf"]
        print(f"| {run.config['loss']} | {classifier} | {run.seed} | {epoch} | {cell(fit['residual'])} | "
              f"{cell(fit['scatter_floor'])} | {cell(fit['shape_residual'])} | {cell(etf['shape_residual'])} | "
              f"{cell(fit['residual_same_class'])} | {cell(fit['residual_diff_class'])} | "
              f"{cell(fit['outside_share'])} | {gamma(fit)} |")
PYTHON
echo "== docs/ufm.md, the fixed-ETF claim (3 seeds each: python bench/ufm_claim.py)"
python bench/ufm_claim.py --out-dir "$RUNS/ufm_claim"

# ------------------------------------------------------------------ 8. the layers figure and per-layer table
echo "== figures: below the last layer"
figure layers.png layers "$SWEEP/cross_entropy_s0" "$SWEEP/mse_s0" "$MANIFOLD/cross_entropy" "$MANIFOLD/mse"
figure representations_layer.png representations "$SWEEP/cross_entropy_s0" "$MANIFOLD/cross_entropy" \
    --layer hidden1 --epochs 1,7,100
echo "== docs/layers.md, per-layer table (Below the last layer, last epoch: NC1, nearest-class-mean accuracy and non-linearity per stage)"
python - "$SWEEP/cross_entropy_s0" "$SWEEP/mse_s0" "$MANIFOLD/cross_entropy" "$MANIFOLD/mse" <<'PYTHON'
import sys
import numpy as np
from plotting.loading import load_features, load_run
runs = [load_run(folder) for folder in sys.argv[1:]]
stages = runs[0].config["nc_layers"]
def columns(what):
    return [f"{what} {stage}" for stage in stages]
print("| loss | mixup | epoch | " + " | ".join(columns("NC1") + columns("NCC acc.") + columns("non-lin.")) + " |")
print("|" + " --- |" * (3 + 3 * len(stages)))
for run in runs:
    record = run.records[-1]
    layers, geometry = record["nc_layers"], record["mixup_geometry"]["layers"]
    cells = [f"{layers[s]['nc1']:.3g}" for s in stages] + [f"{100 * layers[s]['ncc_accuracy']:.1f} %" for s in stages]
    cells += [f"{geometry[s]['diff_class_nonlinearity']:.2f}" for s in stages]
    mixup = "input" if run.config["mixup_layer"] == "input" else f"manifold ({', '.join(run.config['mixup_layers'])})"
    print(f"| {run.config['loss']} | {mixup} | {record['epoch']} | " + " | ".join(cells) + " |")
# The non-linearity compares a point with the straight line between the class means, so a clean
# image (lambda 0 or 1, nothing mixed) scores its own distance from its class mean: that share
# is within-class spread, not bending. Its mean over the different-class pairs' clean ends:
print()
print("| loss | mixup | " + " | ".join(f"non-lin. of the clean ends, {s}" for s in stages) + " |")
print("|" + " --- |" * (2 + len(stages)))
for run in runs:
    payload = load_features(run.folder, run.records[-1]["epoch"])
    mixup = payload["mixup"]
    ends = (mixup["y_a"] != mixup["y_b"]) & ((mixup["lam"] == 0) | (mixup["lam"] == 1))
    a, b, lam = mixup["y_a"][ends], mixup["y_b"][ends], mixup["lam"][ends, None]
    cells = []
    for stage in stages:
        H, means = payload["layers"][stage]["H"][ends].astype(float), payload["layers"][stage]["class_means"]
        straight = lam * means[a] + (1 - lam) * means[b]
        cells.append(f"{np.mean(np.linalg.norm(H - straight, axis=1) / np.linalg.norm(means[a] - means[b], axis=1)):.2f}")
    mixup_name = "input" if run.config["mixup_layer"] == "input" else "manifold"
    print(f"| {run.config['loss']} | {mixup_name} | " + " | ".join(cells) + " |")
PYTHON

# ------------------------------------------------------------------ 9. the cost of --nc-layers all
echo "== docs/layers.md, the cost of --nc-layers all (the default run with and without it (wall times from this machine, at its current load)"
python - "$RUNS/default" "$SWEEP/cross_entropy_s0" "$WALL_MIXUP" "$WALL_NC_LAYERS" <<'PYTHON'
import statistics, sys
from plotting.loading import load_run
plain, layered = load_run(sys.argv[1]), load_run(sys.argv[2])
def training(run):
    return [(r["epoch"], r["train_loss"], r["train_acc"], r["test_acc"], r.get("mixup_loss")) for r in run.records]
same = training(plain) == training(layered)
print(f"training records identical with and without --nc-layers all: {'yes' if same else 'NO'}")
print("| | `python main.py` | `python main.py --nc-layers all` |")
print("| --- | --- | --- |")
print(f"| wall time, start to finish | {sys.argv[3]} s | {sys.argv[4]} s |")
def median_nc(run):
    return statistics.median(r["nc_time_s"] for r in run.records if r.get("nc_time_s") is not None)
print(f"| clean evaluation and NC pass per epoch (median) | {1000 * median_nc(plain):.0f} ms | "
      f"{1000 * median_nc(layered):.0f} ms |")
def ufm_time(run):
    return sum(r["mixup_geometry"]["ufm"]["time_s"] for r in run.records if r.get("mixup_geometry"))
print(f"| UFM fits, all feature epochs together | {ufm_time(plain):.1f} s | {ufm_time(layered):.1f} s |")
PYTHON

# ------------------------------------------------------------------ add new sections above this line

# ------------------------------------------------------------------ done
echo "== done in $(seconds_since "$SCRIPT_START") s; runs and logs kept in $SCRATCH"
