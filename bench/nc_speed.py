"""Speed and exactness of collapse_metrics.nc_metrics against a notebook-style reference.

The reference is written the way the public NC notebooks do it: a loop over
classes, a dense d x d Sigma_W accumulated in float64, and
scipy.sparse.linalg.svds (k = C-1 triplets) for Sigma_B^+. It computes every
DESIGN.md metric, so the two sets of values can be compared key by key.

For each feature set (N samples, d dimensions, C classes; synthetic float32
features: class means plus within-class noise, both inside the span of the
means and anisotropic outside it, partially collapsed, around a common
positive offset as after a ReLU) it prints the best time of each over a few
repeats in a row, their ratio, the time of one float64 N x d x C matmul (the
floor: any exact method reads H at least once in float64), and the largest
relative difference over all metrics.

On a machine shared with other busy processes, OpenMP's spinning threads
steal the core the other thread needs and every parallel step waits for a
time slice: nc_metrics, made of many short steps, suffers more than the
reference's few long ones. There, OMP_WAIT_POLICY=PASSIVE or --threads 1
give steadier numbers (the header prints the load average).

    python bench/nc_speed.py                       # the three sizes of issue 3
    python bench/nc_speed.py --sizes 512x10 --repeats 5 --threads 1
    OMP_WAIT_POLICY=PASSIVE python bench/nc_speed.py
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch
from scipy.sparse.linalg import svds

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from collapse_metrics import METRIC_KEYS, nc_metrics  # noqa: E402

DEFAULT_SAMPLES = 50_000
DEFAULT_SIZES = "512x10,512x100,2048x100"
DEFAULT_REPEATS = 5
# Speed-up targets of issue 3 on the 2-core CPU, by (d, C).
TARGETS = {(512, 10): 15.0, (512, 100): 1.5, (2048, 100): 3.0}
TOLERANCE = 1e-8  # largest allowed relative difference of any metric
# Synthetic geometry: per-dimension spread of the class means, of the
# within-class noise outside and inside the span of the means (the latter
# sets nc1, about SPAN_NOISE^2: partially collapsed), and of the ReLU-like
# common offset of all features.
MEAN_SCALE, NOISE_SCALE, SPAN_NOISE, OFFSET_SCALE = 1.0, 0.5, 0.5, 3.0
CLASSIFIER_NOISE = 1.5  # W = class means + this much noise: nc3 about 0.9, nc4 a few percent or less
REFERENCE_ROWS = 8192   # batch size of the reference's logits / nearest-mean loop


def make_features(n: int, d: int, C: int, seed: int):
    """(H float32 (n, d), y (n,), W (C, d) float32, b (C,) float32), as a network would give them."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(C, d, generator=g) * MEAN_SCALE
    offset = torch.rand(d, generator=g) * OFFSET_SCALE
    noise_scale = NOISE_SCALE * (0.2 + 1.6 * torch.rand(d, generator=g))  # anisotropic within-class noise
    y = torch.randint(C, (n,), generator=g)
    centred = means - means.mean(dim=0)
    span_noise = torch.randn(n, C, generator=g) @ centred * (SPAN_NOISE / math.sqrt(C))
    H = offset + means[y] + span_noise + torch.randn(n, d, generator=g) * noise_scale
    W = means + CLASSIFIER_NOISE * torch.randn(C, d, generator=g)
    b = 0.1 * torch.randn(C, generator=g)
    return H.float(), y, W.float(), b.float()


def reference_metrics(H, y, W, b, C: int) -> dict:
    """The DESIGN.md metrics as the public notebooks compute them (float64 throughout)."""
    N, d = H.shape
    W, b = W.double(), b.double()
    means = torch.zeros(C, d, dtype=torch.float64)
    variances = torch.zeros(C, dtype=torch.float64)
    sigma_w = torch.zeros(d, d, dtype=torch.float64)
    for c in range(C):
        Hc = H[y == c].double()
        means[c] = Hc.mean(dim=0)
        Z = Hc - means[c]
        sigma_w += Z.T @ Z
        variances[c] = Z.square().sum(dim=1).mean()
    sigma_w /= N
    mismatches = 0
    for start in range(0, N, REFERENCE_ROWS):
        Hb = H[start:start + REFERENCE_ROWS].double()
        predicted = (Hb @ W.T + b).argmax(dim=1)
        nearest = torch.cdist(Hb, means).argmin(dim=1)
        mismatches += int((predicted != nearest).sum())

    mu_G = means.mean(dim=0)
    M = (means - mu_G).numpy()
    sigma_b = M.T @ M / C
    eigvec, eigval, _ = svds(sigma_b, k=C - 1, random_state=0)
    inv_sigma_b = eigvec @ np.diag(eigval ** -1) @ eigvec.T
    Sw, Wn = sigma_w.numpy(), W.numpy()

    cdnv = []
    for c in range(C):
        for c2 in range(c + 1, C):
            cdnv.append((variances[c] + variances[c2]).item() / (2 * np.sum((M[c] - M[c2]) ** 2)))
    out = {
        "nc1": np.trace(Sw @ inv_sigma_b) / C,
        "nc1_cdnv": float(np.mean(cdnv)),
        "tr_sigma_w": np.trace(Sw),
        "tr_sigma_b": np.trace(sigma_b),
        "nc3": np.sum((Wn / np.linalg.norm(Wn) - M / np.linalg.norm(M)) ** 2),
        "nc4": mismatches / N,
    }
    for suffix, rows in (("h", M), ("w", Wn)):
        out.update(reference_geometry(suffix, rows))
    return {key: float(value) for key, value in out.items()}


def reference_geometry(suffix: str, rows: np.ndarray) -> dict:
    C = rows.shape[0]
    norms = np.linalg.norm(rows, axis=1)
    cosine = rows @ rows.T / np.outer(norms, norms)
    gram = rows @ rows.T
    etf = (np.eye(C) - np.ones((C, C)) / C) / np.sqrt(C - 1)
    return {
        f"nc2_equinorm_{suffix}": norms.std() / norms.mean(),
        f"nc2_equiangle_{suffix}": cosine[np.triu_indices(C, 1)].std(),
        f"nc2_maxangle_{suffix}": np.abs(cosine + 1 / (C - 1))[~np.eye(C, dtype=bool)].mean(),
        f"nc2_etf_{suffix}": np.linalg.norm(gram / np.linalg.norm(gram) - etf),
    }


def best_times(functions: dict, repeats: int):
    """({name: best wall time}, {name: last result}), calling each function `repeats` times in a row.

    In a row, not in turn: right after numpy/scipy work, OpenBLAS's threads
    still spin for a while and slow the next torch call (and the other way
    round), which would charge one method for the other's threads.
    """
    best, results = {}, {}
    for name, fn in functions.items():
        best[name] = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            results[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, results


def max_relative_difference(ours: dict, reference: dict) -> tuple:
    """(largest |a - b| / max(|a|, |b|) over METRIC_KEYS, the key where it occurs)."""
    worst, where = 0.0, None
    for key in METRIC_KEYS:
        a, r = ours[key], reference[key]
        scale = max(abs(a), abs(r))
        diff = 0.0 if a == r else (math.inf if not math.isfinite(scale) else abs(a - r) / scale)
        if diff > worst or where is None:
            worst, where = max(diff, worst), key
    return worst, where


def parse_sizes(text: str) -> list:
    try:
        sizes = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item]
    except ValueError:
        sizes = []
    if not sizes or any(len(s) != 2 or s[0] < 1 or s[1] < 2 for s in sizes):
        raise argparse.ArgumentTypeError(f"expected DxC[,DxC...] with C >= 2, got {text!r}")
    return sizes


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, metavar="N",
                        help=f"feature rows per set (default {DEFAULT_SAMPLES})")
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes(DEFAULT_SIZES), metavar="DxC[,DxC...]",
                        help=f"feature dimension x classes of each set (default {DEFAULT_SIZES})")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, metavar="R",
                        help=f"timed calls of each method in a row; the best is reported (default {DEFAULT_REPEATS})")
    parser.add_argument("--threads", type=int, default=None, metavar="T",
                        help="torch and BLAS threads (default: torch's default, i.e. the cores)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the synthetic features (default 0)")
    args = parser.parse_args(argv)
    if args.samples < 2 or args.repeats < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--samples must be >= 2, --repeats and --threads >= 1")
    return args


def set_threads(threads):
    if threads is None:
        return
    torch.set_num_threads(threads)
    try:  # numpy/scipy's BLAS (svds, the reference's d x d products)
        from threadpoolctl import threadpool_limits
        threadpool_limits(threads)
    except ImportError:
        pass


def main(argv=None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    print(f"nc_speed: N={args.samples} torch_threads={torch.get_num_threads()} repeats={args.repeats} "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')} torch={torch.__version__} "
          f"load_avg={os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")
    header = f"{'d':>5} {'C':>4} {'reference_s':>11} {'nc_metrics_s':>12} {'speedup':>8} {'target':>7} " \
             f"{'matmul_s':>9} {'max_rel_diff':>12}  {'worst_key':<16} ok"
    lines, all_ok = [header], True
    print(header, flush=True)
    for d, C in args.sizes:
        H, y, W, b = make_features(args.samples, d, C, args.seed)
        H64, W64 = H.double(), W.double()
        times, results = best_times({
            "ours": lambda: nc_metrics(H, y, W, b, num_classes=C),
            "reference": lambda: reference_metrics(H, y, W, b, C),
            "matmul": lambda: H64 @ W64.T,
        }, args.repeats)
        del H64, results["matmul"]
        diff, key = max_relative_difference(results["ours"], results["reference"])
        speedup = times["reference"] / times["ours"]
        target = TARGETS.get((d, C))
        ok = diff <= TOLERANCE and (target is None or speedup >= target)
        all_ok &= ok
        line = f"{d:>5} {C:>4} {times['reference']:>11.3f} {times['ours']:>12.3f} {speedup:>7.1f}x " \
               f"{(f'{target:g}x' if target else '-'):>7} {times['matmul']:>9.4f} {diff:>12.1e}  {key:<16} " \
               f"{'yes' if ok else 'NO'}"
        lines.append(line)
        print(line, flush=True)
    verdict = "all targets met" if all_ok else "TARGETS MISSED"
    print(f"\nsummary ({verdict}; speedup = reference_s / nc_metrics_s, best of {args.repeats}; "
          f"values must agree to {TOLERANCE:g} relative):")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
