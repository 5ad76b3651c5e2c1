"""Does a fixed simplex-ETF classifier bring mixup features closer to the UFM optimum? (issue 20)

Trains the digits defaults for cross-entropy and MSE, with a learned classifier and with a fixed
simplex ETF (--etf-classifier), three seeds each (scripts/sweep.py, on the CPU, two at a time; runs
already complete are kept), then prints, at the last feature epoch, mean ± sample std over the seeds of:

- residual: |P H - s H*|_F / |P H|_F against the run's own classifier (W, b);
- floor: the part of it that the scatter of rows sharing a target sets alone (no s, gamma explains it);
- shape: the residual of the per-target means, the distance to the optimum's shape;
- the same two against the simplex ETF nearest to W with no bias (`ufm_etf`), Fisher et al.'s benchmark
  (for ETF runs it is their own classifier);
- the class-mean and the chord non-linearity of the different-class mixup points;

and then, per loss, the shape residual of the fixed-ETF runs minus that of the learned ones (against
each run's own classifier, and against the ETF benchmark), with Welch's t-test p-value.

    python bench/ufm_claim.py [--out-dir runs/ufm_claim] [--seeds 0,1,2]

It prints the table in markdown, as docs/ufm.md shows it (docs/make_figures.sh calls it).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys

from scipy.stats import ttest_ind

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, PROJECT_DIR)

from plotting.loading import load_run  # noqa: E402

LOSSES = ("cross_entropy", "mse")
CLASSIFIERS = {"learned": [], "fixed ETF": ["--etf-classifier"]}
FOLDERS = {"learned": "learned", "fixed ETF": "etf"}
# (column, where in the last feature epoch's mixup_geometry)
COLUMNS = (
    ("residual", ("ufm", "residual")),
    ("floor", ("ufm", "scatter_floor")),
    ("shape", ("ufm", "shape_residual")),
    ("ETF benchmark: residual", ("ufm_etf", "residual")),
    ("ETF benchmark: shape", ("ufm_etf", "shape_residual")),
    ("non-linearity (class means)", (None, "diff_class_nonlinearity")),
    ("non-linearity (chord)", (None, "diff_class_chord_nonlinearity")),
)


def train(out_dir: str, seeds: str) -> None:
    for classifier, flags in CLASSIFIERS.items():
        command = [sys.executable, os.path.join(PROJECT_DIR, "scripts", "sweep.py"), "--datasets", "digits",
                   "--losses", ",".join(LOSSES), "--seeds", seeds, "--gpus", "cpu", "--jobs", "2",
                   "--out-dir", os.path.join(out_dir, FOLDERS[classifier]), "--", *flags]
        subprocess.run(command, check=True)


def last_geometry(folder: str) -> dict:
    run = load_run(folder)
    geometries = [r["mixup_geometry"] for r in run.records if r.get("mixup_geometry")]
    return geometries[-1]


def value(geometry: dict, where) -> float:
    entry, key = where
    source = geometry if entry is None else geometry[entry]
    number = source.get(key)
    return math.nan if number is None else float(number)


def cell(values) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f} (n = 1)"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def geometries(out_dir: str, loss: str, classifier: str) -> list:
    parent = os.path.join(out_dir, FOLDERS[classifier])
    folders = sorted(os.path.join(parent, name) for name in os.listdir(parent)
                     if f"_{loss}_" in name and os.path.isdir(os.path.join(parent, name)))
    return [last_geometry(folder) for folder in folders]


def table(out_dir: str) -> str:
    lines = ["| loss | classifier | seeds | " + " | ".join(name for name, _ in COLUMNS) + " |",
             "|" + " --- |" * (3 + len(COLUMNS))]
    for loss in LOSSES:
        for classifier in CLASSIFIERS:
            found = geometries(out_dir, loss, classifier)
            cells = [cell([value(g, where) for g in found]) for _, where in COLUMNS]
            lines.append(f"| {loss} | {classifier} | {len(found)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison(out_dir: str) -> str:
    """Fixed ETF minus learned, shape residual, with Welch's p-value (unequal variances)."""
    lines = ["| loss | benchmark | fixed ETF − learned (shape residual) | Welch p |", "|" + " --- |" * 4]
    for loss in LOSSES:
        for benchmark, entry in (("the run's own classifier", "ufm"), ("nearest simplex ETF", "ufm_etf")):
            etf, learned = ([value(g, (entry, "shape_residual")) for g in geometries(out_dir, loss, kind)]
                            for kind in ("fixed ETF", "learned"))
            difference = statistics.mean(etf) - statistics.mean(learned)
            p_value = float(ttest_ind(etf, learned, equal_var=False).pvalue)
            lines.append(f"| {loss} | {benchmark} | {difference:+.3f} | {p_value:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--out-dir", default=os.path.join("runs", "ufm_claim"), metavar="DIR",
                        help="where the runs go (learned/ and etf/ below it)")
    parser.add_argument("--seeds", default="0,1,2", metavar="S,S,...", help="seeds of every setting")
    parser.add_argument("--no-train", action="store_true", help="only print the table of runs already there")
    args = parser.parse_args()
    if not args.no_train:
        train(args.out_dir, args.seeds)
    print(table(args.out_dir))
    print()
    print(comparison(args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
