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
- Everything is float64. Two passes over H, in chunks of rows converted to
  float64: the class sums (a scatter-add of contiguous chunks), then, one
  class at a time (rows sorted by label once), everything else. There each
  chunk is centred on its own class mean, delta = h - mu_c, before any
  product, so a large common offset (features around 1e4) costs no
  precision: nothing subtracts two large, nearly equal numbers. And class by
  class, the centring is a broadcast, not a gathered copy of the means.
- The second pass gets everything from one product per chunk, delta [W; M]^T
  (plus the rows of the given class means, centred on mu_G):
      logits        w_k.h + b_k = w_k.delta + (w_k.mu_c + b_k)
      nearest mean  argmin_k ||h - mu_k||^2 = argmin_k ||mu_c - mu_k||^2 - 2 delta.M_k
                    (the dropped terms do not depend on k; both kept terms are small)
      scatter       sum ||delta||^2, one dot product per chunk.
- Sigma_B has rank <= P-1. With the eigendecomposition G = U diag(lam) U^T,
  Sigma_B^+ = P * M^T U diag(lam^-2) U^T M, hence
      nc1 = (1/N) sum_i || (delta_i M^T) U diag(1/lam) ||^2,  delta_i = h_i - mu_yi.
  Only a P x P eigenproblem and the N x P products above are needed: cost
  O(N d C), never a d x d matrix. Eigenvalues below lam_max * P * 64 * eps
  are rounding (the centring makes G singular by construction) and are dropped.
- No tensor larger than a chunk of rows times d is allocated (the buffers are
  reused), besides O(C d + C^2) statistics and the (N, C) logits. The chunk
  (CHUNK_ELEMENTS) is sized to stay in a CPU's cache across the few
  operations applied to it.
- `all_reduce`, if given, sums float64 statistics across processes in place,
  so that a data-parallel job gets the metrics of the whole split.

Edge cases get a defined value; NaN only where the quantity does not exist,
with the reason under `nan_reasons`:
- classes absent from y: the metrics use the P present classes (recorded as
  `num_classes_present`); the argmax of nc4 still runs over all C classifier rows.
- P = 2: fine (nc2_equiangle is 0 by definition: there is a single pair).
- P < 2: every geometric metric is NaN ("fewer than two classes present").
- d < P-1: Sigma_B has rank d; nc1 uses that rank.
- identical features within each class: nc1 = 0 (exactly for float32 features,
  whose float64 class means are exact; otherwise up to float64 rounding).
- all class means equal (Sigma_B = 0): nc1, nc1_cdnv and the M-based nc2/nc3 are NaN.
- non-finite features or classifier: every metric is NaN, the reason counts the rows;
  the class means leave the non-finite rows out.
Mismatched shapes and labels outside [0, C) are the caller's bug: ValueError.
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
# The metrics of a layer that has no classifier (per-layer NC, ClassMoments), plus its nearest-mean accuracy.
LAYER_METRIC_KEYS = (
    "nc1", "nc1_cdnv", "tr_sigma_w", "tr_sigma_b",
    "nc2_equinorm_h", "nc2_equiangle_h", "nc2_maxangle_h", "nc2_etf_h",
)
# Elements of H held in float64 at a time: bounds every temporary whatever N
# is. On a CPU, 4 MiB chunks stay in cache across the few operations applied
# to each (measured on a 2-core EPYC at d=512: 1.2x faster than 8 MiB chunks,
# 1.5x faster than 32 MiB, and smaller ones pay more per-call overhead); a
# GPU wants large chunks (fewer kernel launches). At least MIN_CHUNK_ROWS
# rows, so that the products stay efficient when d is large.
CHUNK_ELEMENTS = 1 << 19
CHUNK_ELEMENTS_CUDA = 1 << 24
MIN_CHUNK_ROWS = 512
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
    `chunk_rows` bounds the rows of H held in float64 at a time (default:
    CHUNK_ELEMENTS // d, with at least MIN_CHUNK_ROWS).
    """
    with torch.no_grad():  # the out= buffers refuse tensors that require grad
        return _nc_statistics(H, y, W, b, num_classes, class_means, all_reduce, chunk_rows)


def _nc_statistics(H, y, W, b, num_classes, class_means, all_reduce, chunk_rows) -> NCResult:
    H = _as_tensor(H)
    device = H.device
    y = _as_tensor(y, device).long()
    W = _as_tensor(W, device).double()
    C = int(num_classes) if num_classes is not None else W.shape[0]
    b = torch.zeros(C, dtype=torch.float64, device=device) if b is None else _as_tensor(b, device).double()
    _check_inputs(H, y, W, b, C)
    reduce = all_reduce or (lambda tensor: None)
    rows = chunk_rows or _default_chunk_rows(H)

    sums, counts = _class_sums(H, y, C, rows)
    for stat in (sums, counts):
        reduce(stat)
    finite_counts, bad_rows = counts, 0
    if not torch.isfinite(sums).all():  # a diverged model: find the bad rows and leave them out
        sums, finite_counts, bad = _finite_class_sums(H, y, C, rows)
        for stat in (sums, finite_counts, bad):
            reduce(stat)
        bad_rows = int(bad.item())
    usable = finite_counts > 0
    means = torch.where(usable[:, None], sums / finite_counts.clamp(min=1)[:, None], math.nan)
    reference = None if class_means is None else _as_tensor(class_means, device).double()
    second = _second_pass(H, _class_chunks(y, C, rows), W, b, means, usable, reference, reduce)
    classifier_finite = bool(torch.isfinite(W).all() and torch.isfinite(b).all())
    metrics = _assemble(second, W, counts, counts > 0, bad_rows, classifier_finite, reference is not None)
    return NCResult(metrics, second["logits"], means)


def _as_tensor(x, device=None) -> torch.Tensor:
    tensor = torch.from_numpy(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    return tensor if device is None else tensor.to(device)


def _check_inputs(H, y, W, b, C):
    """Shape and label errors are the caller's bugs: say so plainly instead of failing deep inside."""
    if H.dim() != 2 or y.shape != (H.shape[0],):
        raise ValueError(f"H must be (N, d) and y (N,), got {tuple(H.shape)} and {tuple(y.shape)}")
    if W.shape != (C, H.shape[1]) or b.shape != (C,):
        raise ValueError(f"W must be ({C}, {H.shape[1]}) and b ({C},), got {tuple(W.shape)} and {tuple(b.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= C):
        raise ValueError(f"labels must lie in [0, {C}), got [{int(y.min())}, {int(y.max())}]")


def _default_chunk_rows(H) -> int:
    elements = CHUNK_ELEMENTS_CUDA if H.device.type == "cuda" else CHUNK_ELEMENTS
    return max(MIN_CHUNK_ROWS, elements // max(H.shape[1], 1))


def _class_chunks(y, C, rows):
    """[(class, row indices)] covering y class by class, at most `rows` indices each.

    Visiting H one class at a time turns the per-class operations of the
    second pass (deviation from the class mean, scatter) into broadcasts and
    one dot product per chunk, with no gathered copy of the class means.
    """
    order = torch.argsort(y, stable=True)  # stable: a fixed summation order
    ends = torch.bincount(y, minlength=C).cumsum(0).tolist()
    chunks, start = [], 0
    for c, end in enumerate(ends):
        chunks.extend((c, order[s:min(s + rows, end)]) for s in range(start, end, rows))
        start = end
    return chunks


def _row_buffer(H, chunks, dtype=None):
    """A reusable (rows, d) buffer: allocating per chunk costs more than the chunk's arithmetic."""
    rows = max((len(index) for _, index in chunks), default=0)
    return torch.empty(rows, H.shape[1], dtype=dtype or H.dtype, device=H.device)


def _class_sums(H, y, C, rows):
    """Pass 1: per-class float64 sums and counts (non-finite rows make the sums non-finite).

    Contiguous chunks and a scatter-add: the rows need no gathering for a sum.
    """
    sums = torch.zeros(C, H.shape[1], dtype=torch.float64, device=H.device)
    wide = torch.empty(min(rows, H.shape[0]), H.shape[1], dtype=torch.float64, device=H.device)
    for start in range(0, H.shape[0], rows):
        h = wide[:min(rows, H.shape[0] - start)].copy_(H[start:start + rows])
        sums.index_add_(0, y[start:start + rows], h)
    return sums, torch.bincount(y, minlength=C).double()


def _finite_class_sums(H, y, C, rows):
    """Pass 1 again, leaving out and counting the non-finite rows (only after a divergence)."""
    sums = torch.zeros(C, H.shape[1], dtype=torch.float64, device=H.device)
    counts = torch.zeros(C, dtype=torch.float64, device=H.device)
    bad = torch.zeros((), dtype=torch.float64, device=H.device)
    for start in range(0, H.shape[0], rows):
        h, labels = H[start:start + rows].double(), y[start:start + rows]
        finite = torch.isfinite(h).all(dim=1)
        bad += (~finite).sum()
        sums.index_add_(0, labels[finite], h[finite])
        counts += torch.bincount(labels[finite], minlength=C)
    return sums, counts, bad


def _second_pass(H, chunks, W, b, means, usable, reference, reduce):
    """Pass 2: logits, nearest-mean mismatches, within-class scatter, Sigma_B^+ projection.

    All from one product per chunk, delta [W; M; R - mu_G]^T (R: the given
    class means), as the module docstring derives. Per-chunk results land in
    preallocated slots (out=) and are combined after the loop, so that each
    chunk costs few calls besides its four passes: convert, centre, product, dot.
    """
    C, N, device = W.shape[0], H.shape[0], H.device
    geometry = _mean_geometry(W, b, means, usable, reference)
    stacked, whiten_T = geometry["stacked"], geometry["whiten_T"]
    gaps = [geometry["mean_gap"]] + ([geometry["ref_gap"]] if reference is not None else [])
    K, rank = stacked.shape[0], whiten_T.shape[0]

    logits = torch.empty(N, C, dtype=torch.float64, device=device)
    choice = torch.empty(1 + len(gaps), N, dtype=torch.long, device=device)  # argmax, nearest mean(s); sorted rows
    per_chunk = torch.empty(2, len(chunks), dtype=torch.float64, device=device)  # scatter, projected
    raw, delta = _row_buffer(H, chunks), _row_buffer(H, chunks, torch.float64)
    rows = delta.shape[0]
    products = torch.empty(K * rows, dtype=torch.float64, device=device)
    scratch = torch.empty(max(C, rank) * rows, dtype=torch.float64, device=device)
    unused = torch.empty(rows, dtype=torch.float64, device=device)  # the max/min values
    start = 0
    for j, (c, index) in enumerate(chunks):
        n, end = len(index), start + len(index)
        dev = delta[:n].copy_(torch.index_select(H, 0, index, out=raw[:n])).sub_(means[c])
        # Transposed, (K, n): MKL is twice as fast on this shape when K is small.
        prod = torch.mm(stacked, dev.T, out=products[:K * n].view(K, n))
        chunk_logits = prod[:C].add_(geometry["logit_base"][c])
        logits.index_copy_(0, index, chunk_logits.T)
        # max/min(dim): the first index on ties, like argmax, and several times faster on CPU.
        torch.max(chunk_logits, dim=0, out=(unused[:n], choice[0, start:end]))
        for g, gap in enumerate(gaps, start=1):
            distance = torch.add(gap[c], prod[C * g:C * (g + 1)], alpha=-2.0, out=scratch[:C * n].view(C, n))
            torch.min(distance, dim=0, out=(unused[:n], choice[g, start:end]))
        flat = dev.view(-1)
        torch.dot(flat, flat, out=per_chunk[0, j])
        coords = torch.mm(whiten_T, prod[C:2 * C], out=scratch[:rank * n].view(rank, n)).view(-1)
        torch.dot(coords, coords, out=per_chunk[1, j])
        start = end

    classes = torch.tensor([c for c, _ in chunks], dtype=torch.long, device=device)
    scatter = torch.zeros(C, dtype=torch.float64, device=device).index_add_(0, classes, per_chunk[0])
    projected = per_chunk[1].sum()
    mismatch = torch.zeros(2, dtype=torch.float64, device=device)
    for g in range(1, len(gaps) + 1):
        mismatch[g - 1] = (choice[0] != choice[g]).sum()
    for stat in (scatter, projected, mismatch):
        reduce(stat)
    M = geometry["M"]
    return {"logits": logits, "M": M, "gram": geometry["gram"], "scatter": scatter,
            "projected": projected, "mismatch": mismatch, "mean_sq": (M * M).sum(dim=1)}


def _mean_geometry(W, b, means, usable, reference) -> dict:
    """The O(C d + C^2) quantities the second pass needs, from the class means."""
    mu_G = means[usable].mean(dim=0) if usable.any() else torch.zeros_like(means[0])
    M = torch.where(usable[:, None], means - mu_G, 0.0)
    gram = M @ M.T
    eigvals, eigvecs = torch.linalg.eigh(gram)
    cutoff = eigvals.max().clamp(min=0) * max(int(usable.sum()), 1) * EIGEN_RTOL_ULPS * torch.finfo(torch.float64).eps
    keep = eigvals > cutoff
    # Absent training classes are NaN rows of the reference: zeroed here, excluded by ref_gap.
    blocks = [W, M] + ([(reference - mu_G).nan_to_num(nan=0.0)] if reference is not None else [])
    geometry = {
        "M": M, "gram": gram, "stacked": torch.cat(blocks),
        # delta M^T, times this, gives the coordinates whose squares sum to nc1's numerator.
        "whiten_T": (eigvecs[:, keep] / eigvals[keep]).T.contiguous(),
        "logit_base": (means.nan_to_num(nan=0.0) @ W.T + b)[:, :, None],  # [c, k]: w_k.mu_c + b_k
        "mean_gap": _squared_distances(M, M, usable)[:, :, None],
    }
    if reference is not None:
        valid = torch.isfinite(reference).all(dim=1)
        geometry["ref_gap"] = _squared_distances(M, reference - mu_G, valid)[:, :, None]
    return geometry


def _squared_distances(A, B, valid):
    """(rows of A, rows of B) ||a - b_k||^2, +inf for invalid k; differences first, so no cancellation."""
    distance = torch.cdist(A, B.nan_to_num(nan=0.0), compute_mode="donot_use_mm_for_euclid_dist").square()
    return distance.masked_fill(~valid[None, :], math.inf)


def _assemble(second, W, counts, present, bad_rows, classifier_finite, with_reference):
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
    if bad_rows or not classifier_finite:
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


class ClassMoments:
    """Statistics of features that arrive batch by batch, for the NC metrics that need no classifier.

    One pass and O(C d + d^2) float64 memory whatever N: per-class sums,
    counts and squared norms, and the second moment sum_i h_i h_i^T. The
    within-class scatter is then S_W = sum_i h_i h_i^T - sum_c n_c mu_c mu_c^T,
    and every metric of LAYER_METRIC_KEYS follows with the definitions of
    `nc_metrics` (nc1 through the same P x P eigenproblem). The subtraction
    costs about eps64 |h|^2 / (tr S_W / N) of relative precision: under 1e-8
    for float32 features wherever their own rounding (6e-8 |h|) leaves the
    within-class spread measurable. Non-finite rows are counted and left out,
    without a host sync per batch.
    """

    def __init__(self, num_classes: int, dim: int, device):
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)
        self.sums, self.counts, self.squares = zeros(num_classes, dim), zeros(num_classes), zeros(num_classes)
        self.moment, self.nonfinite = zeros(dim, dim), zeros(())

    def add(self, H: torch.Tensor, y: torch.Tensor) -> None:
        h = H.double()
        bad = ~torch.isfinite(h).all(dim=1)
        self.nonfinite += bad.sum()
        h = h.masked_fill(bad[:, None], 0.0)
        self.sums.index_add_(0, y, h)
        self.counts.index_add_(0, y, (~bad).double())
        self.squares.index_add_(0, y, (h * h).sum(dim=1))
        self.moment.addmm_(h.T, h)

    def statistics(self) -> list:
        """The tensors to sum across processes (in place) before `metrics`."""
        return [self.sums, self.counts, self.squares, self.moment, self.nonfinite]

    def class_means(self) -> torch.Tensor:
        """(C, d) float64, NaN rows for classes without samples."""
        return torch.where(self.counts[:, None] > 0, self.sums / self.counts.clamp(min=1)[:, None], math.nan)

    def metrics(self) -> dict:
        N, present = float(self.counts.sum()), self.counts > 0
        P = int(present.sum())
        metrics = {key: math.nan for key in LAYER_METRIC_KEYS}
        reasons = {}
        metrics.update(num_samples=int(N), num_classes_present=P, nan_reasons=reasons)
        bad = int(self.nonfinite)
        why = (f"{bad} feature rows are non-finite" if bad else "no samples" if N == 0
               else "fewer than two classes present" if P < 2 else None)
        if why:
            reasons.update({key: why for key in LAYER_METRIC_KEYS})
            return metrics
        means, counts = self.class_means()[present], self.counts[present]
        M = means - means.mean(dim=0)
        # Rounding can leave an exactly collapsed scatter a hair below zero: clamp it to zero.
        scatter = self.moment - (means.T * counts) @ means
        metrics["tr_sigma_w"] = max(float(torch.trace(scatter)) / N, 0.0)
        metrics["tr_sigma_b"] = float((M * M).sum()) / P
        if metrics["tr_sigma_b"] == 0.0:
            for key in ("nc1", "nc1_cdnv", "nc2_equinorm_h", "nc2_equiangle_h", "nc2_maxangle_h", "nc2_etf_h"):
                reasons[key] = "all class means coincide (Sigma_B = 0)"
            return metrics
        gram, project = _between_class_pinv_factor(M)  # nc1 = tr(A^T S_W A) / N
        metrics["nc1"] = max(float(torch.trace(project.T @ scatter @ project)) / N, 0.0)
        variances = ((self.squares[present] - counts * (means * means).sum(dim=1)) / counts).clamp(min=0.0)
        metrics["nc1_cdnv"] = _cdnv(M, variances, reasons)
        metrics.update(_geometry("h", M, gram, reasons))
        return metrics


def _between_class_pinv_factor(M: torch.Tensor) -> tuple:
    """(G, A) for the P centred class means M (P, d): G = M M^T and A = M^T U diag(1/lam), G = U diag(lam) U^T.

    A A^T = (M^T M)^+ = Sigma_B^+ / P, so tr(S Sigma_B^+) / P = tr(A^T S A) for any d x d S.
    Eigenvalues below lam_max * P * EIGEN_RTOL_ULPS * eps are rounding (M's rows sum to zero) and are dropped.
    """
    gram = M @ M.T
    eigvals, eigvecs = torch.linalg.eigh(gram)
    keep = eigvals > eigvals.max() * M.shape[0] * EIGEN_RTOL_ULPS * torch.finfo(torch.float64).eps
    return gram, M.T @ (eigvecs[:, keep] / eigvals[keep])


def nc1_floor(D, y, class_means, num_classes: Optional[int] = None) -> float:
    """The floor that a perturbation of the features puts under NC1: tr(Sigma_noise Sigma_B^+) / P.

    D (n, d): differences h_fast - h_float32 of the same n samples computed by two
    forwards (e.g. TF32 or bf16 against float32), y (n,) their labels, class_means
    (C, d) the class means of the pass whose NC1 is judged (NaN rows: absent
    classes). With dbar_c the mean difference over the sample's class c and P_s the
    classes present in the sample,
        Sigma_noise = 1/(n - P_s) sum_i (d_i - dbar_yi)(d_i - dbar_yi)^T
    (centred per class: a difference common to a class moves its mean, not the
    spread around it; n - P_s makes it unbiased), and with M the P present class
    means centred on their mean, Sigma_B = (1/P) M^T M as in nc1. Noise of covariance
    Sigma_noise, independent of the features, adds exactly this to NC1's expectation.
    Returns a float; NaN when Sigma_B = 0, fewer than two classes are present, the
    sample has no more rows than classes, or D is not finite.
    """
    with torch.no_grad():
        means = _as_tensor(class_means).double()
        D = _as_tensor(D, means.device).double()
        y = _as_tensor(y, means.device).long()
        moments = ClassMoments(int(num_classes or means.shape[0]), D.shape[1], means.device)
        moments.add(D, y)
        n, sample_classes = float(moments.counts.sum()), int((moments.counts > 0).sum())
        present = torch.isfinite(means).all(dim=1)
        if int(moments.nonfinite) or n <= sample_classes or int(present.sum()) < 2:
            return math.nan
        noise_means = moments.class_means()[moments.counts > 0]
        scatter = moments.moment - (noise_means.T * moments.counts[moments.counts > 0]) @ noise_means
        M = means[present] - means[present].mean(dim=0)
        if float((M * M).sum()) == 0.0:
            return math.nan
        _, project = _between_class_pinv_factor(M)
        return max(float(torch.trace(project.T @ scatter @ project)) / (n - sample_classes), 0.0)


def nearest_mean_hits(H, y, class_means) -> torch.Tensor:
    """How many rows of H are nearest (Euclidean) to their own class's mean; a 0-dim float64 device tensor.

    Classes whose mean is NaN (no samples) are never the nearest; ties go to
    the lower class index, as in nc4.
    """
    H = _as_tensor(H).double()
    means = _as_tensor(class_means, H.device).double()
    y = _as_tensor(y, H.device).long()
    distance = _squared_distances(H, means, torch.isfinite(means).all(dim=1))
    return (distance.argmin(dim=1) == y).sum().double()


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


def nearest_simplex_etf(W) -> torch.Tensor:
    """(C, d) float64: the simplex ETF nearest to the rows of W, scaled to W's mean row norm.

    A standard simplex ETF M (unit rows, M M^T = C/(C-1) (I - 11^T/C)) is rotated onto W by
    orthogonal Procrustes: R (C, d) with orthonormal rows maximising tr(R^T M^T W), from the SVD
    M^T W = U S V^T (R = U V^T). Only R's part orthogonal to 1 matters (M 1 = 0), so M R is the
    same for every maximiser. The benchmark classifier of Fisher et al. 2024, whose optimum is
    derived for a fixed ETF and no bias. Needs d >= C - 1.
    """
    W = _as_tensor(W).double()
    C, d = W.shape
    if C < 2 or d < C - 1:
        raise ValueError(f"a simplex ETF of {C} classes needs 2 <= C <= d + 1 (d = {d})")
    if not bool(torch.isfinite(W).all()):  # a diverged run: no rotation to find
        raise ValueError("W is not finite")
    centred = torch.eye(C, dtype=torch.float64, device=W.device) - 1.0 / C
    standard = centred / centred.norm(dim=1, keepdim=True)
    U, _, Vh = torch.linalg.svd(standard.T @ W, full_matrices=False)
    etf = standard @ (U @ Vh)
    return etf / etf.norm(dim=1, keepdim=True) * W.norm(dim=1).mean()


def mixup_geometry(H, y_a, y_b, lam, class_means, W, b=None, pair=None) -> dict:
    """Summary numbers of the features of mixup points x = lam x_a + (1-lam) x_b.

    mu_c are `class_means` (of the clean training split), mu_G their mean.
    - same_class_alignment: mean over same-class points (y_a == y_b) of
      cos(h - mu_G, w_ya).
    - diff_class_nonlinearity: mean over different-class points of
      ||h - (lam mu_a + (1-lam) mu_b)|| / ||mu_a - mu_b||: 0 when features
      interpolate the class means linearly. Non-zero without any bending
      wherever the clean ends scatter around their class means (NC1 > 0).
    - diff_class_chord_nonlinearity (with `pair`, each point's pair id): the
      same over the chord of its own pair, see `chord_nonlinearity`: 0 when
      the features of each pair's mixed inputs lie on the segment between
      those of its two clean ends, whatever the within-class scatter.
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
    out["diff_class_nonlinearity"] = diff_class_nonlinearity(H, y_a, y_b, lam, means)
    if pair is not None:
        out["diff_class_chord_nonlinearity"] = chord_nonlinearity(H, pair, lam, y_a != y_b)
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


def diff_class_nonlinearity(H, y_a, y_b, lam, class_means) -> float:
    """Mean over different-class points of ||h - (lam mu_a + (1-lam) mu_b)|| / ||mu_a - mu_b||.

    0 when the features of mixed inputs interpolate the class means linearly;
    needs no classifier, so it applies at every layer. NaN without such points.
    """
    H = _as_tensor(H).double()
    device = H.device
    y_a, y_b = _as_tensor(y_a, device).long(), _as_tensor(y_b, device).long()
    lam, means = _as_tensor(lam, device).double(), _as_tensor(class_means, device).double()
    diff = y_a != y_b
    if not diff.any():
        return math.nan
    lam, a, b = lam[diff, None], y_a[diff], y_b[diff]
    straight = lam * means[a] + (1 - lam) * means[b]
    return float(((H[diff] - straight).norm(dim=1) / (means[a] - means[b]).norm(dim=1)).mean())


def chord_nonlinearity(H, pair, lam, mask=None) -> float:
    """Mean over points with 0 < lam < 1 (and `mask`) of
    ||h - (lam h_a + (1-lam) h_b)|| / ||h_a - h_b||, h_a and h_b the features of the point's own
    pair at lam = 1 and lam = 0 (its clean ends; `pair` (n,) ids the pairs).

    Unlike `diff_class_nonlinearity`, which measures against the class means, this is 0 for
    features that are linear along each pair whatever their scatter around the class means: it
    isolates bending. Pairs without both ends in H, or with equal ends, are left out; NaN if none
    is left.
    """
    H = _as_tensor(H).double()
    device = H.device
    pair, lam = _as_tensor(pair, device).long(), _as_tensor(lam, device).double()
    mask = torch.ones_like(lam, dtype=torch.bool) if mask is None else _as_tensor(mask, device).bool()
    count = int(pair.max()) + 1 if pair.numel() else 0
    ends = []
    for end in (1.0, 0.0):  # h_a at lam = 1, h_b at lam = 0
        at = lam == end
        table = torch.full((count, H.shape[1]), math.nan, dtype=torch.float64, device=device)
        table[pair[at]] = H[at]
        ends.append(table)
    h_a, h_b = ends[0][pair], ends[1][pair]
    span = (h_a - h_b).norm(dim=1)
    inside = mask & (lam > 0) & (lam < 1) & torch.isfinite(span) & (span > 0)
    if not inside.any():
        return math.nan
    weight = lam[inside, None]
    chord = weight * h_a[inside] + (1 - weight) * h_b[inside]
    return float(((H[inside] - chord).norm(dim=1) / span[inside]).mean())
