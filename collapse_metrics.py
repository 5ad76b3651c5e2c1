"""Neural-collapse metrics as pure functions on tensors (no I/O, no training).

Notation (Papyan, Han & Donoho 2020; DESIGN.md). H is (N, d), y is (N,), W is
(C, d), b is (C,). Over the P classes present in y:

    mu_c   class means            mu_G = mean of the mu_c (not the sample mean)
    M      rows mu_c - mu_G       G = M M^T  (P x P Gram matrix)
    Sigma_W = (1/N) sum_i (h_i - mu_yi)(h_i - mu_yi)^T
    Sigma_B = (1/P) M^T M

    nc1             Tr(Sigma_W Sigma_B^+) / P
    nc1_cdnv        mean over c < c' of (var_c + var_c') / (2 ||mu_c - mu_c'||^2),
                    var_c = mean over class c of ||h - mu_c||^2   (Galanti et al. 2022)
    nc2_equinorm_*  std / mean of the row norms of M (h) or W (w), population std
    nc2_equiangle_* population std over c < c' of cos(row_c, row_c')
    nc2_maxangle_*  mean over c != c' of |cos(row_c, row_c') + 1/(P-1)|
    nc2_etf_*       || G/||G||_F - (I - 11^T/P)/sqrt(P-1) ||_F, G = M M^T or W W^T
    nc3             || W/||W||_F - M/||M||_F ||_F^2
    nc4             fraction of samples whose argmax_c (w_c.h + b_c) differs from
                    argmin_c ||h - mu_c||
    nc4_train_means the same against given (training) class means: the NCC
                    classifier of Papyan et al. evaluated on another split
    tr_sigma_w, tr_sigma_b   Tr(Sigma_W), Tr(Sigma_B)

How it is computed, and why:
- Everything is float64. Features are converted chunk by chunk, and centred
  on mu_G before any product, so a large common offset (features around 1e4)
  costs no precision: nothing subtracts two large, nearly equal numbers.
- Sigma_B has rank <= P-1. With the eigendecomposition G = U diag(lam) U^T,
  Sigma_B^+ = P * M^T U diag(lam^-2) U^T M, hence
      nc1 = (1/N) sum_i || (delta_i M^T) U diag(1/lam) ||^2,  delta_i = h_i - mu_yi.
  Only a P x P eigenproblem and N x P products are needed: cost O(N d C),
  never a d x d matrix. Eigenvalues below lam_max * P * 64 * eps are rounding
  (the centring makes G singular by construction) and are dropped.
- One (N, 2C) product, (h - mu_G) [W; M]^T, gives both the logits and the
  inner products h.mu_c for the nearest-mean classifier of nc4 and for
  delta_i M^T (= (h - mu_G) M^T - G[y_i]).
- No tensor larger than a chunk of rows times d is allocated, besides
  O(C d + C^2) statistics and the (N, C) logits.
- `all_reduce`, if given, sums float64 statistics across processes in place,
  so that a data-parallel job gets the metrics of the whole split.

Edge cases get a defined value; NaN only where the quantity does not exist,
with the reason under `nan_reasons`:
- classes absent from y: the metrics use the P present classes (recorded as
  `num_classes_present`); the argmax of nc4 still runs over all C classifier rows.
- P = 2: fine (nc2_equiangle is 0 by definition: there is a single pair).
- P < 2: every geometric metric is NaN ("fewer than two classes present").
- d < P-1: Sigma_B has rank d; nc1 uses that rank.
- identical features within each class: nc1 = 0 (up to float64 rounding).
- all class means equal (Sigma_B = 0): nc1, nc1_cdnv and the M-based nc2/nc3 are NaN.
- non-finite features or classifier: every metric is NaN, the reason counts the rows.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch

METRIC_KEYS = (
    "nc1", "nc1_cdnv", "tr_sigma_w", "tr_sigma_b",
    "nc2_equinorm_h", "nc2_equinorm_w", "nc2_equiangle_h", "nc2_equiangle_w",
    "nc2_maxangle_h", "nc2_maxangle_w", "nc2_etf_h", "nc2_etf_w",
    "nc3", "nc4",
)
# Rows of H converted to float64 at a time: bounds the working set to
# CHUNK_ELEMENTS doubles per temporary, whatever N is.
CHUNK_ELEMENTS = 1 << 22
# Relative eigenvalue cut-off of the Gram matrix, in units of P * eps.
EIGEN_RTOL_ULPS = 64.0

AllReduce = Optional[Callable[[torch.Tensor], None]]


class NCResult(NamedTuple):
    metrics: dict          # plain Python values, see the module docstring
    logits: torch.Tensor   # (N, C) float64, the classifier's outputs on H
    class_means: torch.Tensor  # (C, d) float64, NaN rows for absent classes


def nc_metrics(H, y, W, b=None, num_classes=None, class_means=None) -> dict:
    """NC metrics of features H (N, d) with labels y under classifier (W, b).

    Accepts torch tensors on any device or numpy arrays; computes in float64;
    returns plain Python values (see the module docstring for the formulas).
    `class_means` (C, d), e.g. the training means, adds `nc4_train_means`.
    """
    return nc_statistics(H, y, W, b, num_classes, class_means).metrics


def nc_statistics(H, y, W, b=None, num_classes=None, class_means=None,
                  all_reduce: AllReduce = None, chunk_rows: Optional[int] = None) -> NCResult:
    """`nc_metrics` plus the logits and class means it computes on the way.

    With `all_reduce`, H and y are this process's shard; the statistics are
    summed across processes and the metrics are those of the union.
    """
    H = _as_tensor(H)
    device = H.device
    y = _as_tensor(y, device).long()
    W = _as_tensor(W, device).double()
    C = int(num_classes) if num_classes is not None else W.shape[0]
    b = torch.zeros(C, dtype=torch.float64, device=device) if b is None else _as_tensor(b, device).double()
    reduce = all_reduce or (lambda tensor: None)
    rows = chunk_rows or max(1, CHUNK_ELEMENTS // max(H.shape[1], 1))

    sums, counts, bad_rows = _class_sums(H, y, C, rows)
    for stat in (sums, counts, bad_rows):
        reduce(stat)
    present = counts > 0
    means = torch.where(present[:, None], sums / counts.clamp(min=1)[:, None], math.nan)
    reference = None if class_means is None else _as_tensor(class_means, device).double()
    second = _second_pass(H, y, W, b, means, present, reference, rows, reduce)
    metrics = _assemble(second, W, counts, present, int(bad_rows.item()), reference is not None)
    return NCResult(metrics, second["logits"], means)


def _as_tensor(x, device=None) -> torch.Tensor:
    tensor = torch.from_numpy(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    return tensor if device is None else tensor.to(device)


def _class_sums(H, y, C, rows):
    """Pass 1: per-class float64 sums and counts; non-finite rows are counted, not summed."""
    d = H.shape[1]
    sums = torch.zeros(C, d, dtype=torch.float64, device=H.device)
    counts = torch.zeros(C, dtype=torch.float64, device=H.device)
    bad = torch.zeros((), dtype=torch.float64, device=H.device)
    for start in range(0, H.shape[0], rows):
        h = H[start:start + rows].double()
        labels = y[start:start + rows]
        finite = torch.isfinite(h).all(dim=1)
        bad += (~finite).sum()
        sums.index_add_(0, labels, torch.where(finite[:, None], h, 0.0))
        counts += torch.bincount(labels, minlength=C)[:C]
    return sums, counts, bad


def _second_pass(H, y, W, b, means, present, reference, rows, reduce):
    """Pass 2: logits, nearest-mean mismatches, within-class scatter, Sigma_B^+ projection."""
    C = W.shape[0]
    mu_G = means[present].mean(dim=0) if present.any() else torch.zeros_like(means[0])
    M = torch.where(present[:, None], means - mu_G, 0.0)
    gram = M @ M.T
    eigvals, eigvecs = torch.linalg.eigh(gram)
    cutoff = eigvals.max().clamp(min=0) * max(int(present.sum()), 1) * EIGEN_RTOL_ULPS * torch.finfo(torch.float64).eps
    keep = eigvals > cutoff
    # delta M^T times this gives the coordinates whose squares sum to nc1's numerator.
    whiten = eigvecs[:, keep] / eigvals[keep]
    blocks = [W, M] + ([reference - mu_G] if reference is not None else [])
    stacked = torch.cat(blocks).nan_to_num(nan=0.0)
    logit_offset = W @ mu_G + b
    mean_sq = (M * M).sum(dim=1)
    ref_sq = ((reference - mu_G) ** 2).sum(dim=1) if reference is not None else None
    ref_valid = torch.isfinite(reference).all(dim=1) if reference is not None else None

    device = H.device
    scatter = torch.zeros(C, dtype=torch.float64, device=device)
    projected = torch.zeros((), dtype=torch.float64, device=device)
    mismatch = torch.zeros(2, dtype=torch.float64, device=device)
    logits = torch.empty(H.shape[0], C, dtype=torch.float64, device=device)
    for start in range(0, H.shape[0], rows):
        labels = y[start:start + rows]
        centred = H[start:start + rows].double() - mu_G
        products = centred @ stacked.T
        chunk_logits = products[:, :C] + logit_offset
        logits[start:start + rows] = chunk_logits
        predicted = chunk_logits.argmax(dim=1)
        nearest = _nearest(mean_sq, products[:, C:2 * C], present)
        mismatch[0] += (predicted != nearest).sum()
        if reference is not None:
            mismatch[1] += (predicted != _nearest(ref_sq, products[:, 2 * C:], ref_valid)).sum()
        deviation = centred - M[labels]
        scatter.index_add_(0, labels, (deviation * deviation).sum(dim=1))
        projected += ((products[:, C:2 * C] - gram[labels]) @ whiten).square().sum()
    for stat in (scatter, projected, mismatch):
        reduce(stat)
    return {"logits": logits, "M": M, "gram": gram, "eigvals": eigvals[keep], "scatter": scatter,
            "projected": projected, "mismatch": mismatch, "mean_sq": mean_sq}


def _nearest(mean_sq, inner, valid):
    """argmin_c ||h - m_c||^2 = argmin_c (||m_c||^2 - 2 h.m_c), over valid classes only."""
    distance = (mean_sq - 2.0 * inner).masked_fill(~valid, math.inf)
    return distance.argmin(dim=1)


def _assemble(second, W, counts, present, bad_rows, with_reference):
    N = float(counts.sum())
    P = int(present.sum())
    metrics = {key: math.nan for key in METRIC_KEYS}
    reasons = {}
    metrics.update(num_samples=int(N), num_classes_present=P, nan_reasons=reasons)
    if with_reference:
        metrics["nc4_train_means"] = math.nan
    if N == 0:
        reasons.update({key: "no samples" for key in metrics if isinstance(metrics[key], float)})
        return metrics
    if bad_rows or not torch.isfinite(W).all():
        what = f"{bad_rows} of {int(N)} feature rows are non-finite" if bad_rows else "classifier is non-finite"
        reasons.update({key: what for key in metrics if isinstance(metrics[key], float)})
        return metrics
    metrics["nc4"] = float(second["mismatch"][0]) / N
    if with_reference:
        metrics["nc4_train_means"] = float(second["mismatch"][1]) / N
    if P < 2:
        reasons.update({key: "fewer than two classes present" for key in METRIC_KEYS if key != "nc4"})
        return metrics

    M, Wp = second["M"][present], W[present]
    scatter, within = second["scatter"][present], second["scatter"].sum() / N
    metrics["tr_sigma_w"] = float(within)
    metrics["tr_sigma_b"] = float(second["mean_sq"].sum() / P)
    metrics.update(_geometry("w", Wp, Wp @ Wp.T, reasons))
    if metrics["tr_sigma_b"] == 0.0:
        for key in ("nc1", "nc1_cdnv", "nc2_equinorm_h", "nc2_equiangle_h", "nc2_maxangle_h", "nc2_etf_h", "nc3"):
            reasons[key] = "all class means coincide (Sigma_B = 0)"
        return metrics
    metrics["nc1"] = float(second["projected"] / N)
    metrics["nc1_cdnv"] = _cdnv(M, scatter / counts[present], reasons)
    gram = second["gram"][present][:, present]
    metrics.update(_geometry("h", M, gram, reasons))
    metrics["nc3"] = float((Wp / Wp.norm() - M / M.norm()).square().sum())
    return metrics


def _cdnv(M, variances, reasons):
    distances = torch.cdist(M, M, compute_mode="donot_use_mm_for_euclid_dist").square()
    upper = torch.triu_indices(M.shape[0], M.shape[0], offset=1, device=M.device)
    pair_distance = distances[upper[0], upper[1]]
    if (pair_distance == 0).any():
        reasons["nc1_cdnv"] = "two class means coincide"
        return math.nan
    pair_variance = variances[upper[0]] + variances[upper[1]]
    return float((pair_variance / (2.0 * pair_distance)).mean())


def _geometry(suffix, rows, gram, reasons):
    """NC2 equinorm, equiangularity, max-angle and ETF distance of the rows of M or W."""
    P = rows.shape[0]
    keys = [f"nc2_{name}_{suffix}" for name in ("equinorm", "equiangle", "maxangle", "etf")]
    norms = rows.norm(dim=1)
    if (norms == 0).any():
        reasons.update({key: f"a {'class-mean' if suffix == 'h' else 'classifier'} row is zero" for key in keys})
        return {key: math.nan for key in keys}
    cosine = gram / (norms[:, None] * norms[None, :])
    upper = torch.triu_indices(P, P, offset=1, device=rows.device)
    off_diagonal = ~torch.eye(P, dtype=torch.bool, device=rows.device)
    target = (torch.eye(P, dtype=torch.float64, device=rows.device) - 1.0 / P) / math.sqrt(P - 1)
    return {
        keys[0]: float(norms.std(unbiased=False) / norms.mean()),
        keys[1]: float(cosine[upper[0], upper[1]].std(unbiased=False)),
        keys[2]: float((cosine[off_diagonal] + 1.0 / (P - 1)).abs().mean()),
        keys[3]: float((gram / gram.norm() - target).norm()),
    }


def simplex_etf(num_classes: int, dim: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(C, d) rows of a simplex equiangular tight frame with unit-norm rows.

    W W^T = C/(C-1) (I - 11^T/C). Needs d >= C-1. The (C-1)-dimensional
    simplex is embedded in R^d by a random orthonormal map drawn from
    `generator`, as in Papyan et al.'s fixed-classifier experiments.
    """
    if num_classes < 2 or dim < num_classes - 1:
        raise ValueError(f"a simplex ETF of {num_classes} classes needs 2 <= C <= d + 1 (d = {dim})")
    centred = torch.eye(num_classes, dtype=torch.float64) - 1.0 / num_classes
    basis, _ = torch.linalg.qr(centred[:, :num_classes - 1])  # orthonormal basis of 1-perp
    coords = centred @ basis  # (C, C-1): the simplex vertices in that basis
    embed, _ = torch.linalg.qr(torch.randn(dim, num_classes - 1, dtype=torch.float64, generator=generator))
    etf = coords @ embed.T
    return etf / etf.norm(dim=1, keepdim=True)


def mixup_geometry(H, y_a, y_b, lam, class_means, W, b=None) -> dict:
    """Summary numbers of the features of mixup points x = lam x_a + (1-lam) x_b.

    mu_c are `class_means` (of the clean training split), mu_G their mean.
    - same_class_alignment: mean over same-class points (y_a == y_b) of
      cos(h - mu_G, w_ya).
    - diff_class_nonlinearity: mean over different-class points of
      ||h - (lam mu_a + (1-lam) mu_b)|| / ||mu_a - mu_b||: 0 when features
      interpolate the class means linearly.
    - per lambda value (sorted, `lambdas`), over different-class points:
      pred_a_fraction / pred_b_fraction / pred_other_fraction, the share
      predicted as class a, class b or another class, and margin_ab, the
      mean of logit_a - logit_b.
    """
    H = _as_tensor(H).double()
    device = H.device
    y_a, y_b = _as_tensor(y_a, device).long(), _as_tensor(y_b, device).long()
    lam = _as_tensor(lam, device).double()
    means = _as_tensor(class_means, device).double()
    W = _as_tensor(W, device).double()
    b = torch.zeros(W.shape[0], dtype=torch.float64, device=device) if b is None else _as_tensor(b, device).double()
    mu_G = means[torch.isfinite(means).all(dim=1)].mean(dim=0)
    logits = H @ W.T + b
    same = y_a == y_b
    out = {"lambdas": [], "pred_a_fraction": [], "pred_b_fraction": [], "pred_other_fraction": [], "margin_ab": []}

    centred = H[same] - mu_G
    rows = W[y_a[same]]
    cosine = (centred * rows).sum(dim=1) / (centred.norm(dim=1) * rows.norm(dim=1))
    out["same_class_alignment"] = float(cosine.mean()) if same.any() else math.nan

    diff = ~same
    lam_d, a, b_ = lam[diff], y_a[diff], y_b[diff]
    straight = lam_d[:, None] * means[a] + (1 - lam_d[:, None]) * means[b_]
    departure = (H[diff] - straight).norm(dim=1) / (means[a] - means[b_]).norm(dim=1)
    out["diff_class_nonlinearity"] = float(departure.mean()) if diff.any() else math.nan
    predicted = logits[diff].argmax(dim=1)
    margin = logits[diff].gather(1, a[:, None]).squeeze(1) - logits[diff].gather(1, b_[:, None]).squeeze(1)
    for value in torch.unique(lam_d).tolist():
        at = lam_d == value
        is_a, is_b = predicted[at] == a[at], predicted[at] == b_[at]
        out["lambdas"].append(value)
        out["pred_a_fraction"].append(float(is_a.double().mean()))
        out["pred_b_fraction"].append(float(is_b.double().mean()))
        out["pred_other_fraction"].append(float((~is_a & ~is_b).double().mean()))
        out["margin_ab"].append(float(margin[at].mean()))
    return out
