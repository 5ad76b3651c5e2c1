"""Whether ufm gives bit-identical results to an earlier revision's: for refactors that promise
behaviour unchanged (issue 23 split ufm.py into the package ufm/).

Both sides run the same fits and optima in a child interpreter each, the earlier one in a copy of
that revision's tree (`git archive`), so that the two `ufm`s never share a process: every loss
(and label smoothing, mse_scale, focal_gamma variants), learned classifiers with and without their
bias, at several seeds and sizes, features planted from the optimum plus noise, in float32 as the
feature capture stores them. Every metric of `ufm.fit` must be equal (NaN to NaN), and H_fit and
`ufm.optimal_features` equal bit for bit. Prints one line per difference and a count; exits 1 on any.

    python bench/ufm_identity.py --rev f69fa6f     # the last commit with ufm.py in one file
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run in a child whose first path entry is a tree: one ufm, the fits of every case, as JSON.
CASES_SCRIPT = r"""
import hashlib, json, math, sys
import numpy as np, torch
import ufm

def digest(tensor):
    return hashlib.sha256(tensor.detach().contiguous().numpy().tobytes()).hexdigest()

def targets(C):  # the mixup targets of the triple (0, 1, 2): same-class points and the 6 pair types
    lambdas = np.linspace(0.0, 1.0, 11)
    rows = [lam * np.eye(C)[a] + (1 - lam) * np.eye(C)[b] for a in range(3) for b in range(3) for lam in lambdas]
    return torch.tensor(np.array(rows))

LOSSES = [("cross_entropy", {}), ("focal", {}), ("mse", {}), ("mae", {}), ("smooth_l1", {}),
          ("cross_entropy", {"label_smoothing": 0.1}), ("mse", {"mse_scale": 3.0}), ("focal", {"focal_gamma": 5.0})]
results = {}
for seed in range(int(sys.argv[1])):
    for C, d in ((4, 6), (5, 9), (10, 12)):
        g = torch.Generator().manual_seed(1000 * seed + C)
        W = torch.randn(C, d, generator=g, dtype=torch.float64) * (1 + torch.rand(C, 1, generator=g, dtype=torch.float64))
        b = 0.5 * torch.randn(C, generator=g, dtype=torch.float64)
        T = targets(C)
        gamma = 0.1 * float(torch.linalg.matrix_norm(W, 2)) ** 2
        for loss, options in LOSSES:
            H = 2.0 * ufm.optimal_features(W, b, T, loss, gamma, **options)
            H = (H + 0.2 * H.std() * torch.randn(H.shape, generator=g, dtype=H.dtype)).float()
            for bias in ("b", "none"):
                fitted = ufm.fit(H, T, W, b if bias == "b" else None, loss, **options)
                key = f"seed={seed} C={C} {loss} {json.dumps(options)} bias={bias}"
                results[key] = {"metrics": {k: (repr(v) if isinstance(v, float) else v) for k, v in fitted.metrics.items()},
                                "H_fit": digest(fitted.H_fit),
                                "optimum": digest(ufm.optimal_features(W, b if bias == "b" else None, T, loss, gamma, **options))}
print(json.dumps(results))
"""


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", required=True, metavar="REV", help="the earlier revision (a commit, tag or branch)")
    parser.add_argument("--seeds", type=int, default=4, metavar="N", help="seeds of each size and loss (default 4)")
    return parser.parse_args(argv)


def fits_in(tree: Path, seeds: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", CASES_SCRIPT, str(seeds)], cwd=tree, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the fits in {tree} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def tree_of(rev: str, destination: Path) -> Path:
    archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=ROOT, capture_output=True)
    if archive.returncode != 0:
        raise RuntimeError(f"git archive {rev}: {archive.stderr.decode().strip()}")
    tar_path = destination / "tree.tar"
    tar_path.write_bytes(archive.stdout)
    with tarfile.open(tar_path) as tar:
        tar.extractall(destination / "tree", filter="data")
    return destination / "tree"


def differences(before: dict, after: dict) -> list:
    lines = [f"{key}: only in one side" for key in sorted(set(before) ^ set(after))]
    for key in sorted(set(before) & set(after)):
        old, new = before[key], after[key]
        for name in sorted(set(old["metrics"]) | set(new["metrics"])):
            if old["metrics"].get(name) != new["metrics"].get(name):
                lines.append(f"{key}: {name} {old['metrics'].get(name)} -> {new['metrics'].get(name)}")
        lines += [f"{key}: {part} differs" for part in ("H_fit", "optimum") if old[part] != new[part]]
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            before = fits_in(tree_of(args.rev, Path(scratch)), args.seeds)
        after = fits_in(ROOT, args.seeds)
    except RuntimeError as error:
        print(f"ufm_identity: {error}", file=sys.stderr)
        return 2
    found = differences(before, after)
    print("\n".join(found))
    print(f"ufm_identity: {len(after)} fits (every metric, H_fit, the optimum) against {args.rev}: "
          f"{len(found)} difference(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
