"""collapse_metrics against DESIGN.md's formulas, hand-worked values and its edge cases."""
import math
import threading

import numpy as np
import pytest
import torch

from collapse_metrics import (LAYER_METRIC_KEYS, METRIC_KEYS, ClassMoments, diff_class_nonlinearity, mixup_geometry,
                              nc_metrics, nc_statistics, nearest_mean_hits, simplex_etf)

AGREEMENT_RTOL = 1e-8   # issue 3: values equal to 1e-8 relative
ZERO_ATOL = 1e-12       # below this a value is rounding noise around 0
# Singular values of Sigma_B below this fraction of the largest are rounding:
# far above d * eps, far below the genuine ones of any test set here.
PINV_RCOND = 1e-10
OFFSET = 1e4            # the common offset of issue 3's float32 check
SEEDS = (0, 1, 2)


# ---------------------------------------------------------------- the slow transcription

def design_metrics(H, y, W, b=None, class_means=None) -> dict:
    """DESIGN.md's table, literally: float64 numpy, d x d covariances, a dense pseudo-inverse.

    Over the P classes present in y; nc4's argmax runs over all classifier rows.
    """
    H, W = np.asarray(H, dtype=np.float64), np.asarray(W, dtype=np.float64)
    y = np.asarray(y)
    b = np.zeros(len(W)) if b is None else np.asarray(b, dtype=np.float64)
    classes = np.unique(y)
    P, N = len(classes), len(H)
    mu = np.stack([H[y == c].mean(axis=0) for c in classes])
    M = mu - mu.mean(axis=0)
    deviation = H - mu[np.searchsorted(classes, y)]
    sigma_w = deviation.T @ deviation / N
    sigma_b = M.T @ M / P
    variances = [np.mean(np.sum(deviation[y == c] ** 2, axis=1)) for c in classes]
    cdnv = [(variances[i] + variances[j]) / (2 * np.sum((mu[i] - mu[j]) ** 2))
            for i in range(P) for j in range(i + 1, P)]
    Wp = W[classes]
    predicted = np.argmax(H @ W.T + b, axis=1)
    out = {
        "nc1": np.trace(sigma_w @ np.linalg.pinv(sigma_b, rcond=PINV_RCOND, hermitian=True)) / P,
        "nc1_cdnv": np.mean(cdnv),
        "tr_sigma_w": np.trace(sigma_w),
        "tr_sigma_b": np.trace(sigma_b),
        "nc3": np.sum((Wp / np.linalg.norm(Wp) - M / np.linalg.norm(M)) ** 2),
        "nc4": np.mean(predicted != classes[nearest(H, mu)]),
        **design_geometry("h", M),
        **design_geometry("w", Wp),
    }
    if class_means is not None:
        R = np.asarray(class_means, dtype=np.float64)
        valid = np.flatnonzero(np.isfinite(R).all(axis=1))
        out["nc4_train_means"] = np.mean(predicted != valid[nearest(H, R[valid])])
    return {key: float(value) for key, value in out.items()}


def nearest(H, means):
    """Index of the nearest row of `means` for each row of H, by explicit distances."""
    return np.argmin(((H[:, None, :] - means[None, :, :]) ** 2).sum(axis=2), axis=1)


def design_geometry(suffix, rows) -> dict:
    P = len(rows)
    norms = np.linalg.norm(rows, axis=1)
    cosine = rows @ rows.T / np.outer(norms, norms)
    gram = rows @ rows.T
    etf = (np.eye(P) - np.ones((P, P)) / P) / np.sqrt(P - 1)
    return {
        f"nc2_equinorm_{suffix}": norms.std() / norms.mean(),
        f"nc2_equiangle_{suffix}": cosine[np.triu_indices(P, 1)].std(),
        f"nc2_maxangle_{suffix}": np.abs(cosine + 1 / (P - 1))[~np.eye(P, dtype=bool)].mean(),
        f"nc2_etf_{suffix}": np.linalg.norm(gram / np.linalg.norm(gram) - etf),
    }


def assert_agrees(ours: dict, expected: dict, rtol=AGREEMENT_RTOL):
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, rel=rtol, abs=ZERO_ATOL), key


# ---------------------------------------------------------------- feature sets

def clustered(seed, n=400, d=12, C=5, noise=0.6):
    """Random class means, unequal class sizes, anisotropic noise, an unaligned classifier."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(C, d)) * 2.0
    y = rng.integers(C, size=n)
    y[:C] = np.arange(C)  # every class present
    H = means[y] + noise * rng.normal(size=(n, d)) * rng.uniform(0.2, 2.0, size=d)
    W = means + rng.normal(size=(C, d))
    b = 0.5 * rng.normal(size=C)
    return H, y, W, b


def planted_etf(C, d, rng):
    """(C, d) unit rows of a simplex ETF in a random C-1 dimensional subspace (independent of simplex_etf)."""
    centred = (np.eye(C) - 1.0 / C) * np.sqrt(C / (C - 1))  # rows: unit norm, cosines -1/(C-1)
    basis, _ = np.linalg.qr(rng.normal(size=(d, C)))
    return centred @ basis.T


def near_etf(seed, n=500, d=16, C=6, noise=1e-2):
    """Features collapsed onto a scaled simplex ETF, up to small noise; classifier near the same ETF."""
    rng = np.random.default_rng(seed)
    etf = planted_etf(C, d, rng)
    y = rng.permutation(np.arange(n) % C)
    H = 5.0 * etf[y] + noise * rng.normal(size=(n, d))
    W = etf + 1e-3 * rng.normal(size=(C, d))
    return H, y, W, np.zeros(C)


# ---------------------------------------------------------------- agreement with DESIGN.md

@pytest.mark.parametrize("seed", SEEDS)
def test_random_features_agree_with_design_formulas(seed):
    H, y, W, b = clustered(seed)
    assert_agrees(nc_metrics(H, y, W, b), design_metrics(H, y, W, b))


@pytest.mark.parametrize("seed", SEEDS)
def test_near_etf_features_agree_with_design_formulas(seed):
    H, y, W, b = near_etf(seed)
    ours = nc_metrics(H, y, W, b)
    assert_agrees(ours, design_metrics(H, y, W, b))
    assert ours["nc1"] < 1e-4 and ours["nc2_etf_h"] < 1e-2  # the planted collapse is seen


def test_returns_plain_python_values_for_numpy_and_torch_inputs():
    H, y, W, b = clustered(0)
    from_numpy = nc_metrics(H, y, W, b)
    from_torch = nc_metrics(torch.from_numpy(H).float(), torch.from_numpy(y), torch.from_numpy(W), torch.from_numpy(b))
    for key in METRIC_KEYS:
        assert type(from_numpy[key]) is float and type(from_torch[key]) is float
    assert from_numpy["num_samples"] == len(y) and from_numpy["num_classes_present"] == 5
    assert from_numpy["nan_reasons"] == {}


def test_exact_simplex_etf_features_with_etf_classifier_give_zero():
    C, d, per_class = 5, 8, 20
    etf = simplex_etf(C, d, torch.Generator().manual_seed(0))
    y = torch.arange(C).repeat(per_class)
    metrics = nc_metrics(3.0 * etf[y], y, etf)
    for key in METRIC_KEYS:
        if key != "tr_sigma_b":
            assert abs(metrics[key]) < ZERO_ATOL, key
    assert metrics["tr_sigma_b"] == pytest.approx(9.0)  # mu_G = 0 and ||3 e_c||^2 = 9 for every class


def test_hand_computed_example():
    # Three classes in the plane, two points each, integer coordinates (exact in float):
    #   class 0: (4,0),(2,0)    mean (3,0)    deviations +-(1,0)
    #   class 1: (0,4),(0,2)    mean (0,3)    deviations +-(0,1)
    #   class 2: (-2,-4),(-4,-2) mean (-3,-3) deviations +-(1,-1)
    # mu_G = 0, so M = the means. N = 6, P = 3.
    # Sigma_W = (2[[1,0],[0,0]] + 2[[0,0],[0,1]] + 2[[1,-1],[-1,1]]) / 6 = [[2,-1],[-1,2]] / 3, Tr = 4/3.
    # Sigma_B = M^T M / 3 = [[18,9],[9,18]] / 3 = [[6,3],[3,6]], Tr = 12, inverse [[6,-3],[-3,6]] / 27.
    # Sigma_W Sigma_B^-1 = [[15,-12],[-12,15]] / 81, Tr = 30/81, so nc1 = 30/81/3 = 10/81.
    # cdnv: var = 1, 1, 2; squared distances 18 (0-1), 45 (0-2), 45 (1-2):
    #   mean(2/36, 3/90, 3/90) = (1/18 + 1/15) / 3 = 11/270.
    # Row norms 3, 3, 3 sqrt2: std/mean = (2 - sqrt2)/(2 + sqrt2) = 3 - 2 sqrt2.
    # Cosines 0, -1/sqrt2, -1/sqrt2: population std 1/3;
    #   maxangle = mean of |cos + 1/2| over the 6 ordered pairs = (1 + 4 (1/sqrt2 - 1/2)) / 6 = (2 sqrt2 - 1)/6.
    # G = M M^T = 9 [[1,0,-1],[0,1,-1],[-1,-1,2]], ||G||_F = 9 sqrt10; with T = (I - 11^T/3)/sqrt2,
    #   ||G/||G|| - T||^2 = 1 + 1 - 2 <G/||G||, T> = 2 - 4/sqrt5.
    # W = M / 3 (so nc3 = 0 and the W metrics equal the M ones), b = (0, 0, -9): the logits of
    #   (-2,-4) are (-2,-4,-3) -> class 0 and of (-4,-2) are (-4,-2,-3) -> class 1, while both are
    #   nearest to mean 2; the other four points agree: nc4 = 2/6.
    H = np.array([[4, 0], [2, 0], [0, 4], [0, 2], [-2, -4], [-4, -2]], dtype=np.float64)
    y = np.array([0, 0, 1, 1, 2, 2])
    W = np.array([[1, 0], [0, 1], [-1, -1]], dtype=np.float64)
    b = np.array([0.0, 0.0, -9.0])
    metrics = nc_metrics(H, y, W, b)
    root2 = math.sqrt(2.0)
    expected = {
        "nc1": 10 / 81, "nc1_cdnv": 11 / 270, "tr_sigma_w": 4 / 3, "tr_sigma_b": 12.0,
        "nc2_equinorm_h": 3 - 2 * root2, "nc2_equiangle_h": 1 / 3,
        "nc2_maxangle_h": (2 * root2 - 1) / 6, "nc2_etf_h": math.sqrt(2 - 4 / math.sqrt(5)),
        "nc3": 0.0, "nc4": 2 / 6,
    }
    expected.update({key.replace("_h", "_w"): value for key, value in expected.items() if key.startswith("nc2")})
    assert_agrees(metrics, expected, rtol=1e-12)


# ---------------------------------------------------------------- invariances and precision

def test_invariant_to_permuting_class_labels():
    H, y, W, b = clustered(3)
    permutation = np.array([3, 0, 4, 1, 2])  # class c becomes class permutation[c]
    W_perm, b_perm = np.empty_like(W), np.empty_like(b)
    W_perm[permutation], b_perm[permutation] = W, b
    assert_agrees(nc_metrics(H, permutation[y], W_perm, b_perm), nc_metrics(H, y, W, b), rtol=1e-12)


def test_invariant_to_translation():
    H, y, W, b = clustered(4)
    shift = np.random.default_rng(4).normal(size=H.shape[1]) * 50.0
    # The bias absorbs the shift, so the logits (and nc4) stay those of the same points.
    assert_agrees(nc_metrics(H + shift, y, W, b - W @ shift), nc_metrics(H, y, W, b), rtol=1e-10)


@pytest.mark.parametrize("collapse", [1.0, 1e-2])
def test_float32_features_at_large_offset_are_exact(collapse):
    # Values a network would give: float32, all near 1e4, the class structure in the low digits.
    H, y, W, b = clustered(5, noise=0.6 * collapse)
    H32 = (H + OFFSET).astype(np.float32)
    exact = design_metrics(H32.astype(np.float64), y, W, b)
    assert_agrees(nc_metrics(H32, y, W, b), exact)
    assert_agrees(nc_metrics(torch.from_numpy(H32), torch.from_numpy(y), W, b), exact)


def test_chunk_size_does_not_change_the_values():
    H, y, W, b = clustered(6, n=300)
    means = design_class_means(H, y, 5) + 0.1
    small = nc_statistics(H, y, W, b, class_means=means, chunk_rows=7)
    large = nc_statistics(H, y, W, b, class_means=means, chunk_rows=10_000)
    assert_agrees(small.metrics, large.metrics, rtol=1e-12)
    torch.testing.assert_close(small.logits, large.logits, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(small.class_means, large.class_means, rtol=1e-13, atol=0)


def design_class_means(H, y, C):
    return np.stack([H[y == c].mean(axis=0) for c in range(C)])


def test_statistics_return_logits_and_class_means():
    H, y, W, b = clustered(7)
    result = nc_statistics(H, y, W, b)
    assert result.logits.dtype == torch.float64 and result.logits.shape == (len(y), 5)
    np.testing.assert_allclose(result.logits.numpy(), H @ W.T + b, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(result.class_means.numpy(), design_class_means(H, y, 5), rtol=1e-13)


# ---------------------------------------------------------------- nc4 against given class means

def test_nc4_train_means_with_given_class_means():
    H_train, y_train, W, b = clustered(8)
    H_test, y_test, _, _ = clustered(9)  # other means: the NCC of the training split often disagrees
    train_means = nc_statistics(H_train, y_train, W, b).class_means
    metrics = nc_metrics(H_test, y_test, W, b, class_means=train_means)
    expected = design_metrics(H_test, y_test, W, b, class_means=train_means.numpy())
    assert_agrees(metrics, expected)
    assert 0 < metrics["nc4_train_means"] <= 1


def test_nc4_train_means_equals_nc4_for_the_split_own_means():
    H, y, W, b = clustered(10)
    own = design_class_means(H, y, 5)
    metrics = nc_metrics(H, y, W, b, class_means=own)
    assert metrics["nc4_train_means"] == metrics["nc4"]


def test_nc4_train_means_skips_classes_absent_from_the_training_split():
    H, y, W, b = clustered(11)
    means = design_class_means(H, y, 5)
    means[2] = np.nan  # class 2 had no training samples
    metrics = nc_metrics(H, y, W, b, class_means=means)
    assert metrics["nc4_train_means"] == pytest.approx(design_metrics(H, y, W, b, means)["nc4_train_means"])
    assert "nc4_train_means" not in metrics["nan_reasons"]


# ---------------------------------------------------------------- edge cases of issue 3

def test_class_absent_from_split_uses_present_classes():
    H, y, W, b = clustered(12, C=5)
    keep = y != 2
    H, y = H[keep], y[keep]
    metrics = nc_metrics(H, y, W, b, num_classes=5)
    assert metrics["num_classes_present"] == 4
    assert metrics["nan_reasons"] == {}
    assert_agrees(metrics, design_metrics(H, y, W, b))
    assert torch.isnan(nc_statistics(H, y, W, b).class_means[2]).all()


def test_two_classes():
    H, y, W, b = clustered(13, C=2)
    metrics = nc_metrics(H, y, W, b)
    assert_agrees(metrics, design_metrics(H, y, W, b))
    # A single pair of means: they are opposite around mu_G, equal in norm, at the ETF's angle.
    assert metrics["nc2_equiangle_h"] == 0.0 and metrics["nc2_equiangle_w"] == 0.0
    for key in ("nc2_equinorm_h", "nc2_maxangle_h", "nc2_etf_h"):
        assert abs(metrics[key]) < ZERO_ATOL, key


def test_fewer_dimensions_than_classes_minus_one():
    H, y, W, b = clustered(14, d=2, C=6)
    metrics = nc_metrics(H, y, W, b)
    assert metrics["nan_reasons"] == {}
    assert_agrees(metrics, design_metrics(H, y, W, b))  # Sigma_B has rank d = 2 < C - 1 = 5


@pytest.mark.parametrize("seed", [0, 1])
def test_many_classes_in_few_dimensions(seed):
    # Sigma_B of rank 3 with 100 classes: 96 eigenvalues of G are rounding noise, which the
    # cut-off (relative, growing with P) must drop, or nc1 picks up their inverses.
    H, y, W, b = clustered(seed, n=1000, d=3, C=100)
    metrics = nc_metrics(H, y, W, b)
    assert metrics["num_classes_present"] == 100
    assert_agrees(metrics, design_metrics(H, y, W, b))


def test_cdnv_of_two_close_means_among_many_classes():
    # 30 classes, two of whose means are 1e-6 apart: their pair dominates cdnv, and its squared
    # distance must come from the difference of the means (a |a|^2 + |b|^2 - 2 a.b formula, which
    # torch's cdist uses above 25 rows by default, loses most of its digits).
    rng = np.random.default_rng(41)
    C, d, per_class = 30, 8, 4
    means = rng.normal(size=(C, d)) * 3.0
    means[1] = means[0] + 1e-6 * rng.normal(size=d)
    y = np.repeat(np.arange(C), per_class)
    H = means[y] + 1e-7 * rng.normal(size=(C * per_class, d))
    W = rng.normal(size=(C, d))
    assert nc_metrics(H, y, W)["nc1_cdnv"] == pytest.approx(design_metrics(H, y, W)["nc1_cdnv"], rel=AGREEMENT_RTOL)


def test_nearest_mean_of_points_next_to_the_bisector_of_close_means():
    # 20 pairs of classes: pair centres ~1e3 apart, the two means of a pair ~1e-3 apart. Each class
    # has a point a hair (1e-7 of the gap) on its own side of the pair's bisector and its mirror
    # image (so the mean stays put). The classifier picks the pair by its centre, then the even
    # class: nc4 is exactly the share of odd classes' points, 1/2, if every nearest mean is right,
    # which needs squared distances computed from differences (not |a|^2 + |b|^2 - 2 a.b).
    rng = np.random.default_rng(35)
    pairs, d, t = 20, 6, 0.5 - 1e-7
    centres = rng.normal(size=(pairs, d)) * 1e3
    halves = rng.normal(size=(pairs, d)) * 1e-3
    means = np.empty((2 * pairs, d))
    means[0::2], means[1::2] = centres - halves, centres + halves
    step = means[np.arange(2 * pairs) ^ 1] - means  # towards the other class of the pair
    H = np.concatenate([means + t * step, means - t * step])
    y = np.tile(np.arange(2 * pairs), 2)
    W = np.repeat(centres, 2, axis=0)
    b = -0.5 * (W ** 2).sum(axis=1) + (np.arange(2 * pairs) % 2 == 0)
    with np.errstate(invalid="ignore", divide="ignore"):  # equal classifier rows: the design's W cosines
        expected = design_metrics(H, y, W, b, class_means=means)
    assert expected["nc4"] == expected["nc4_train_means"] == 0.5
    metrics = nc_metrics(H, y, W, b, class_means=means)
    assert metrics["nc4"] == 0.5 and metrics["nc4_train_means"] == 0.5


def test_identical_features_within_each_class_give_zero_nc1():
    H, y, W, b = clustered(15)
    # float32 values: the float64 mean of n copies of a float32 number is that number exactly.
    H = design_class_means(H, y, 5).astype(np.float32)[y]
    metrics = nc_metrics(H, y, W, b)
    assert metrics["nc1"] == 0.0 and metrics["nc1_cdnv"] == 0.0 and metrics["tr_sigma_w"] == 0.0
    assert metrics["nc4"] == pytest.approx(design_metrics(H, y, W, b)["nc4"])


def test_identical_class_means_give_nan_with_reason():
    _, y, W, b = clustered(16)
    H = np.ones((len(y), 12), dtype=np.float32) * 0.25  # every feature equal: Sigma_B = Sigma_W = 0
    metrics = nc_metrics(H, y, W, b)
    for key in ("nc1", "nc1_cdnv", "nc2_equinorm_h", "nc2_equiangle_h", "nc2_maxangle_h", "nc2_etf_h", "nc3"):
        assert math.isnan(metrics[key]) and metrics["nan_reasons"][key] == "all class means coincide (Sigma_B = 0)", key
    assert metrics["tr_sigma_b"] == 0.0 and metrics["tr_sigma_w"] == 0.0
    assert 0.0 <= metrics["nc4"] <= 1.0 and math.isfinite(metrics["nc2_etf_w"])


@pytest.mark.parametrize("bad_value", [math.nan, math.inf])
def test_non_finite_features_give_nan_with_reason(bad_value):
    H, y, W, b = clustered(17)
    H = H.copy()
    H[[3, 30], 1] = bad_value  # two diverged rows
    result = nc_statistics(H, y, W, b)
    for key in METRIC_KEYS:
        assert math.isnan(result.metrics[key]), key
        assert result.metrics["nan_reasons"][key] == f"2 of {len(y)} feature rows are non-finite"
    finite = np.ones(len(y), dtype=bool)
    finite[[3, 30]] = False  # the class means leave the bad rows out
    np.testing.assert_allclose(result.class_means.numpy(), design_class_means(H[finite], y[finite], 5), rtol=1e-13)


def test_non_finite_classifier_gives_nan_with_reason():
    H, y, W, b = clustered(18)
    W = W.copy()
    W[1, 0] = math.nan
    metrics = nc_metrics(H, y, W, b)
    assert all(math.isnan(metrics[key]) for key in METRIC_KEYS)
    assert metrics["nan_reasons"]["nc1"] == "classifier is non-finite"


def test_single_class_and_empty_split():
    H, y, W, b = clustered(19)
    one = nc_metrics(H[y == 1], y[y == 1], W, b)
    assert one["num_classes_present"] == 1 and 0.0 <= one["nc4"] <= 1.0
    assert math.isnan(one["nc1"]) and one["nan_reasons"]["nc1"] == "fewer than two classes present"
    assert "nc4" not in one["nan_reasons"]  # nc4 needs no second class
    empty = nc_metrics(H[:0], y[:0], W, b, class_means=design_class_means(H, y, 5))
    assert empty["num_samples"] == 0 and empty["nan_reasons"]["nc4"] == "no samples"
    assert math.isnan(empty["nc4_train_means"]) and empty["nan_reasons"]["nc4_train_means"] == "no samples"
    lone = nc_metrics(H[:0], y[:0], W[:1], b[:1])  # a one-row classifier, no samples
    assert lone["num_samples"] == 0 and lone["nan_reasons"]["nc1"] == "no samples"


def test_labels_out_of_range_are_refused():
    H, y, W, b = clustered(20)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\), got \[1, 5\]"):
        nc_metrics(H, y + 1, W, b)


def test_mismatched_shapes_are_refused_with_both_shapes():
    H, y, W, b = clustered(20, n=50, d=12, C=5)
    cases = [
        ((H, y[:-1], W, b), r"H must be \(N, d\) and y \(N,\), got \(50, 12\) and \(49,\)"),
        ((H[:, 0], y, W, b), r"H must be \(N, d\) and y \(N,\), got \(50,\) and \(50,\)"),
        ((H, y, W[:, :-1], b), r"W must be \(5, 12\) and b \(5,\), got \(5, 11\) and \(5,\)"),
        ((H, y, W, b[:-1]), r"W must be \(5, 12\) and b \(5,\), got \(5, 12\) and \(4,\)"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            nc_metrics(*args)
    # num_classes must agree with the classifier's rows: C = 6 asks for a (6, d) W.
    with pytest.raises(ValueError, match=r"W must be \(6, 12\)"):
        nc_metrics(H, y, W, b, num_classes=6)
    with pytest.raises(ValueError, match=r"W must be \(6, 12\)"):
        nc_statistics(H, y, W, b, num_classes=6)


def test_bfloat16_features_are_accepted():
    # What a network under autocast gives: a tensor numpy cannot hold, so it must stay a tensor.
    H, y, W, b = clustered(33)
    H16 = torch.from_numpy(H).to(torch.bfloat16)
    assert_agrees(nc_metrics(H16, y, W, b), design_metrics(H16.double().numpy(), y, W, b))


def test_features_that_require_grad_are_accepted():
    H, y, W, b = clustered(21)
    features = torch.from_numpy(H).requires_grad_()
    assert_agrees(nc_metrics(features, y, W, b), nc_metrics(H, y, W, b), rtol=0)


# ---------------------------------------------------------------- all_reduce and devices

class ThreadSum:
    """`all_reduce` for shards run in threads: every call sums the participants' tensors in place."""

    def __init__(self, parties: int):
        self.barrier = threading.Barrier(parties, timeout=60)  # a mismatched call fails, not hangs
        self.slots = [None] * parties

    def for_rank(self, rank: int):
        def all_reduce(tensor: torch.Tensor) -> None:
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            total = sum(self.slots[1:], self.slots[0].clone())  # the same order in every thread
            self.barrier.wait()  # all have read before any slot is overwritten
            tensor.copy_(total)
        return all_reduce


def run_sharded(shards, W, b, class_means=None):
    """nc_statistics of each (H, y) shard, in its own thread, summing through ThreadSum."""
    collective, results, errors = ThreadSum(len(shards)), [None] * len(shards), []

    def work(rank):
        try:
            H, y = shards[rank]
            results[rank] = nc_statistics(H, y, W, b, class_means=class_means,
                                          all_reduce=collective.for_rank(rank))
        except Exception as error:  # reported below, in the test's thread
            errors.append(error)
            collective.barrier.abort()

    threads = [threading.Thread(target=work, args=(rank,)) for rank in range(len(shards))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


def test_all_reduce_over_shards_equals_the_whole_split():
    H, y, W, b = clustered(22, n=500)
    train_means = design_class_means(H, y, 5) + 0.05
    whole = nc_statistics(H, y, W, b, class_means=train_means)
    # The first shard lacks class 4 entirely: the union must still see it.
    first = y != 4
    first[250:] = False
    shards = [(H[first], y[first]), (H[~first], y[~first])]
    results = run_sharded(shards, W, b, class_means=train_means)
    for result in results:
        assert_agrees(result.metrics, whole.metrics, rtol=1e-11)
        assert result.metrics["num_samples"] == len(y)
        torch.testing.assert_close(result.class_means, whole.class_means, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(results[0].logits.numpy(), whole.logits.numpy()[first], rtol=1e-13, atol=1e-12)


def test_all_reduce_agrees_on_non_finite_rows_in_one_shard():
    H, y, W, b = clustered(23, n=200)
    H = H.copy()
    H[150, 0] = math.nan  # only the second shard diverged
    results = run_sharded([(H[:100], y[:100]), (H[100:], y[100:])], W, b)
    for result in results:
        assert result.metrics["nan_reasons"]["nc1"] == "1 of 200 feature rows are non-finite"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_and_cpu_give_the_same_values():
    H, y, W, b = clustered(24, n=2000, d=64, C=10)
    means = design_class_means(H, y, 10) + 0.1
    cpu = nc_statistics(torch.from_numpy(H).float(), torch.from_numpy(y), W, b, class_means=means)
    gpu = nc_statistics(torch.from_numpy(H).float().cuda(), torch.from_numpy(y).cuda(),
                        torch.from_numpy(W).cuda(), torch.from_numpy(b).cuda(), class_means=means)
    assert_agrees(gpu.metrics, cpu.metrics, rtol=1e-10)
    assert gpu.logits.is_cuda
    torch.testing.assert_close(gpu.logits.cpu(), cpu.logits, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_features_with_the_rest_on_the_cpu():
    # "torch tensors on any device": H on the GPU, labels, classifier and means on the CPU (as
    # tensors and as numpy arrays) are moved to H's device, and every output lives there.
    H, y, W, b = clustered(36, n=600, d=16, C=6)
    means = design_class_means(H, y, 6) + 0.1
    H_gpu = torch.from_numpy(H).cuda()
    for labels, classifier, bias, reference in ((torch.from_numpy(y), torch.from_numpy(W), torch.from_numpy(b),
                                                 torch.from_numpy(means)), (y, W, b, means)):
        result = nc_statistics(H_gpu, labels, classifier, bias, class_means=reference, chunk_rows=64)
        assert result.logits.is_cuda and result.class_means.is_cuda
        assert_agrees(result.metrics, design_metrics(H, y, W, b, class_means=means))
        np.testing.assert_allclose(result.logits.cpu().numpy(), H @ W.T + b, rtol=1e-12, atol=1e-12)
    y_b = np.roll(y, 1)
    lam = np.linspace(0.0, 1.0, len(y))
    out = mixup_geometry(H_gpu, torch.from_numpy(y), torch.from_numpy(y_b), torch.from_numpy(lam),
                         torch.from_numpy(means), torch.from_numpy(W), torch.from_numpy(b))
    expected = design_mixup_geometry(H, y, y_b, lam, means, W, b)
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, rel=1e-10), key
    # The per-layer functions, called with the rest on the CPU (mixup_geometry hands
    # diff_class_nonlinearity tensors it has already moved).
    nonlinearity = diff_class_nonlinearity(H_gpu, y, y_b, lam, means)
    assert nonlinearity == pytest.approx(expected["diff_class_nonlinearity"], rel=1e-10)
    hits = nearest_mean_hits(H_gpu, y, means)
    assert hits.is_cuda and float(hits) == float(np.sum(nearest(H, means) == y))


# ---------------------------------------------------------------- simplex_etf and mixup_geometry

@pytest.mark.parametrize("C, d", [(2, 1), (3, 2), (10, 9), (10, 64)])
def test_simplex_etf_gram_matrix(C, d):
    etf = simplex_etf(C, d, torch.Generator().manual_seed(C))
    assert etf.shape == (C, d)
    expected = C / (C - 1) * (torch.eye(C, dtype=torch.float64) - 1.0 / C)
    torch.testing.assert_close(etf @ etf.T, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(etf.norm(dim=1), torch.ones(C, dtype=torch.float64), rtol=0, atol=1e-14)


def test_simplex_etf_refuses_too_few_dimensions_or_classes():
    with pytest.raises(ValueError, match=r"a simplex ETF of 10 classes needs 2 <= C <= d \+ 1 \(d = 8\)"):
        simplex_etf(10, 8)
    with pytest.raises(ValueError, match="a simplex ETF of 1 classes"):
        simplex_etf(1, 8)


def test_simplex_etf_is_reproducible_from_its_generator():
    first = simplex_etf(5, 7, torch.Generator().manual_seed(3))
    second = simplex_etf(5, 7, torch.Generator().manual_seed(3))
    assert torch.equal(first, second)


def test_mixup_geometry_on_features_linear_in_lambda():
    # Class means on a simplex ETF, the ETF as classifier, mixup features exactly on the segment
    # between the two class means: no nonlinearity; logit_a - logit_b = (2 lam - 1) C/(C-1)
    # (e_a.e_a = 1, e_a.e_b = -1/(C-1)), so lam > 1/2 predicts a and lam < 1/2 predicts b.
    # Same-class points sit at mu_G + 2 w_a: perfectly aligned with their classifier row.
    C, d = 3, 6
    etf = simplex_etf(C, d, torch.Generator().manual_seed(1))
    lambdas = torch.tensor([0.2, 0.8], dtype=torch.float64)
    y_a = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    y_b = torch.tensor([1, 2, 0, 1, 2, 0, 0, 1])  # the last two pairs are same-class
    lam = lambdas.repeat(4)
    H = lam[:, None] * etf[y_a] + (1 - lam[:, None]) * etf[y_b]
    same = y_a == y_b
    H[same] = etf.mean(dim=0) + 2.0 * etf[y_a[same]]
    out = mixup_geometry(H, y_a, y_b, lam, etf, etf)
    assert abs(out["diff_class_nonlinearity"]) < ZERO_ATOL
    assert out["same_class_alignment"] == pytest.approx(1.0, abs=ZERO_ATOL)
    assert out["lambdas"] == pytest.approx([0.2, 0.8])
    assert out["pred_a_fraction"] == [0.0, 1.0] and out["pred_b_fraction"] == [1.0, 0.0]
    assert out["pred_other_fraction"] == [0.0, 0.0]
    assert out["margin_ab"] == pytest.approx([(2 * 0.2 - 1) * C / (C - 1), (2 * 0.8 - 1) * C / (C - 1)])


def test_mixup_geometry_measures_departure_from_the_segment():
    # Each different-class point pushed off the segment by a vector of length 0.5 ||mu_a - mu_b||
    # (orthogonal to everything else here), so the departure ratio is 0.5 for every point.
    means = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], dtype=torch.float64)
    W = means.clone()
    lam = torch.tensor([0.3, 0.6], dtype=torch.float64)
    y_a, y_b = torch.tensor([0, 1]), torch.tensor([1, 0])
    straight = lam[:, None] * means[y_a] + (1 - lam[:, None]) * means[y_b]
    H = straight + torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)  # ||mu_0 - mu_1|| = 2
    out = mixup_geometry(H, y_a, y_b, lam, means, W)
    assert out["diff_class_nonlinearity"] == pytest.approx(0.5)
    assert math.isnan(out["same_class_alignment"])  # no same-class pairs


# ---------------------------------------------------------------- edge cases that mutation testing found untested (issue 16)

def test_a_class_with_a_single_sample_is_present_and_its_mean_is_that_sample():
    H, y, W, b = clustered(25)
    single = np.flatnonzero(y == 3)[0]
    keep = (y != 3) | (np.arange(len(y)) == single)
    H, y = H[keep], y[keep]
    result = nc_statistics(H, y, W, b)
    assert result.metrics["num_classes_present"] == 5 and result.metrics["nan_reasons"] == {}
    assert_agrees(result.metrics, design_metrics(H, y, W, b))
    np.testing.assert_array_equal(result.class_means[3].numpy(), H[y == 3][0])


def test_non_finite_rows_in_several_chunks_are_all_counted_and_left_out():
    H, y, W, b = clustered(26, n=100)
    order = np.argsort(y, kind="stable")  # sorted labels: most chunks of 7 rows miss most classes
    H, y = H[order].copy(), y[order]
    bad = [2, 40, 97]  # in the first, the sixth and the last chunk
    H[bad, 0] = [math.nan, math.inf, -math.inf]
    result = nc_statistics(H, y, W, b, chunk_rows=7)
    assert result.metrics["nan_reasons"]["nc1"] == f"3 of {len(y)} feature rows are non-finite"
    finite = np.ones(len(y), dtype=bool)
    finite[bad] = False
    np.testing.assert_allclose(result.class_means.numpy(), design_class_means(H[finite], y[finite], 5), rtol=1e-13)


@pytest.mark.parametrize("scale", [1e-9, 1e9])
def test_tiny_and_huge_features_agree_with_design_formulas(scale):
    # The eigenvalue cut-off is relative to the largest eigenvalue: no absolute floor may drop
    # (or keep) eigenvalues of features whose scale is far from 1.
    H, y, W, b = clustered(27)
    ours = nc_metrics(H * scale, y, W, b)
    for key, value in design_metrics(H * scale, y, W, b).items():
        assert ours[key] == pytest.approx(value, rel=AGREEMENT_RTOL, abs=0), key
    assert ours["nc1"] == pytest.approx(design_metrics(H, y, W, b)["nc1"], rel=AGREEMENT_RTOL)  # scale-free


def test_two_coinciding_class_means_among_four_make_only_cdnv_nan():
    # Integer features (exact sums): classes 0 and 1 share the mean (1, 0, 0) with different scatter.
    H = np.array([[2, 1, 0], [0, -1, 0], [1, 1, 1], [1, -1, -1],
                  [-1, 2, 0], [-1, 0, 0], [0, -3, 1], [0, -1, -1]], dtype=np.float64)
    y = np.repeat(np.arange(4), 2)
    W = np.random.default_rng(28).normal(size=(4, 3))
    metrics = nc_metrics(H, y, W)
    assert math.isnan(metrics["nc1_cdnv"]) and metrics["nan_reasons"] == {"nc1_cdnv": "two class means coincide"}
    with np.errstate(divide="ignore"):  # the design's cdnv divides by the zero distance
        expected = design_metrics(H, y, W)
    del expected["nc1_cdnv"]
    assert_agrees(metrics, expected)


def test_a_zero_classifier_row_gives_nan_w_geometry_with_reason():
    H, y, W, b = clustered(29)
    W = W.copy()
    W[2] = 0.0
    metrics = nc_metrics(H, y, W, b)
    w_keys = [f"nc2_{name}_w" for name in ("equinorm", "equiangle", "maxangle", "etf")]
    assert metrics["nan_reasons"] == {key: "a classifier row is zero" for key in w_keys}
    assert all(math.isnan(metrics[key]) for key in w_keys)
    with np.errstate(invalid="ignore"):  # the design's cosines divide by the zero norm
        expected = {key: value for key, value in design_metrics(H, y, W, b).items() if key not in w_keys}
    assert_agrees(metrics, expected)


def test_a_class_mean_at_the_global_mean_gives_nan_h_geometry_with_reason():
    # Class means (-2, 0), (2, 0), (0, 0): mu_G = 0, so class 2's row of M is zero.
    H = np.array([[-2, 1], [-2, -1], [2, 2], [2, -2], [0, 3], [0, -3]], dtype=np.float64)
    y = np.repeat(np.arange(3), 2)
    W = np.array([[-1.0, 0.5], [1.0, 0.0], [0.2, 1.0]])
    metrics = nc_metrics(H, y, W)
    h_keys = [f"nc2_{name}_h" for name in ("equinorm", "equiangle", "maxangle", "etf")]
    assert metrics["nan_reasons"] == {key: "a class-mean row is zero" for key in h_keys}
    assert all(math.isnan(metrics[key]) for key in h_keys)
    with np.errstate(invalid="ignore"):  # the design's cosines divide by the zero norm
        expected = {key: value for key, value in design_metrics(H, y, W).items() if key not in h_keys}
    assert_agrees(metrics, expected)


def design_mixup_geometry(H, y_a, y_b, lam, means, W, b):
    """mixup_geometry's docstring, point by point in numpy."""
    mu_G = means[np.isfinite(means).all(axis=1)].mean(axis=0)
    logits = H @ W.T + b
    same = [i for i in range(len(H)) if y_a[i] == y_b[i]]
    diff = [i for i in range(len(H)) if y_a[i] != y_b[i]]
    alignment = [np.dot(H[i] - mu_G, W[y_a[i]]) / np.linalg.norm(H[i] - mu_G) / np.linalg.norm(W[y_a[i]])
                 for i in same]
    departure = [np.linalg.norm(H[i] - lam[i] * means[y_a[i]] - (1 - lam[i]) * means[y_b[i]])
                 / np.linalg.norm(means[y_a[i]] - means[y_b[i]]) for i in diff]
    out = {"same_class_alignment": np.mean(alignment), "diff_class_nonlinearity": np.mean(departure),
           "lambdas": sorted({lam[i] for i in diff})}
    for name in ("pred_a_fraction", "pred_b_fraction", "pred_other_fraction", "margin_ab"):
        out[name] = []
    for value in out["lambdas"]:
        at = [i for i in diff if lam[i] == value]
        predicted = [np.argmax(logits[i]) for i in at]
        out["pred_a_fraction"].append(np.mean([p == y_a[i] for p, i in zip(predicted, at)]))
        out["pred_b_fraction"].append(np.mean([p == y_b[i] for p, i in zip(predicted, at)]))
        out["pred_other_fraction"].append(np.mean([p not in (y_a[i], y_b[i]) for p, i in zip(predicted, at)]))
        out["margin_ab"].append(np.mean([logits[i, y_a[i]] - logits[i, y_b[i]] for i in at]))
    return out


def test_mixup_geometry_with_offset_means_unequal_rows_and_a_bias():
    # mu_G far from 0, classifier rows of unequal norms, a bias, a class absent from training
    # (NaN mean, left out of mu_G): nothing here can cancel a sign or a norm by symmetry.
    rng = np.random.default_rng(30)
    C, d, n = 5, 6, 60
    means = rng.normal(size=(C, d)) + 3.0
    means[4] = np.nan
    W = rng.normal(size=(C, d)) * np.array([0.5, 1.0, 2.0, 3.0, 1.5])[:, None]
    b = rng.normal(size=C) * 2.0
    y_a = rng.integers(0, 4, n)
    y_b = np.where(np.arange(n) % 4 == 0, y_a, rng.integers(0, 4, n))  # a quarter same-class at least
    lam = rng.choice([0.2, 0.5, 0.9], size=n)
    H = lam[:, None] * means[y_a] + (1 - lam[:, None]) * means[y_b] + rng.normal(size=(n, d))
    ours = mixup_geometry(H, y_a, y_b, lam, means, W, b)
    expected = design_mixup_geometry(H, y_a, y_b, lam, means, W, b)
    assert all(0 < max(expected[key]) < 1 for key in ("pred_a_fraction", "pred_b_fraction", "pred_other_fraction"))
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, rel=1e-12), key


# ---------------------------------------------------------------- every tensor on the input's device

# The GPU tests are skipped on a CPU machine, so a tensor made on the default device instead of
# H's goes unseen there. With the default device set to 'meta' (no data), such a tensor fails the
# first operation that meets a CPU tensor, or shows in the outputs' .device; the tensors made on H's
# device stay on the CPU and give the design's values.
DEFAULT_ELSEWHERE = "meta"


def test_no_tensor_is_made_on_the_default_device():
    H, y, W, _ = clustered(31, n=120)
    means = design_class_means(H, y, 5) + 0.1
    means[4] = np.nan  # a class absent from the training split
    H_t, y_t = torch.from_numpy(H), torch.from_numpy(y)
    with torch.device(DEFAULT_ELSEWHERE):
        result = nc_statistics(H_t, y_t, W, class_means=means, chunk_rows=16)  # b=None: zeros on H's device
    assert result.logits.device == H_t.device and result.class_means.device == H_t.device
    assert_agrees(result.metrics, design_metrics(H, y, W, class_means=means))
    np.testing.assert_allclose(result.logits.numpy(), H @ W.T, rtol=1e-12, atol=1e-12)


def test_no_tensor_is_made_on_the_default_device_for_non_finite_rows():
    H, y, W, b = clustered(32, n=60)
    H = H.copy()
    H[[5, 50], 2] = math.nan
    with torch.device(DEFAULT_ELSEWHERE):
        result = nc_statistics(torch.from_numpy(H), torch.from_numpy(y), W, b, chunk_rows=16)
    assert result.metrics["nan_reasons"]["nc1"] == "2 of 60 feature rows are non-finite"
    finite = np.isfinite(H).all(axis=1)
    np.testing.assert_allclose(result.class_means.numpy(), design_class_means(H[finite], y[finite], 5), rtol=1e-13)


def test_no_tensor_is_made_on_the_default_device_by_mixup_geometry():
    C, d = 3, 4
    means = torch.tensor([[2.0, 0, 0, 1], [0, 2.0, 0, 1], [0, 0, 2.0, 1]], dtype=torch.float64)
    W = torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 1.0, 0]], dtype=torch.float64)
    y_a, y_b = torch.tensor([0, 1, 0, 2]), torch.tensor([0, 1, 1, 0])
    lam = torch.tensor([1.0, 1.0, 0.75, 0.25], dtype=torch.float64)
    H = lam[:, None] * means[y_a] + (1 - lam[:, None]) * means[y_b]
    with torch.device(DEFAULT_ELSEWHERE):
        out = mixup_geometry(H, y_a, y_b, lam, means, W)  # b=None: zeros on H's device
    # Points on their segments; the two same-class points are their class means.
    expected = design_mixup_geometry(H.numpy(), y_a.numpy(), y_b.numpy(), lam.numpy(), means.numpy(),
                                     W.numpy(), np.zeros(C))
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, rel=1e-12, abs=ZERO_ATOL), key


# ---------------------------------------------------------------- ClassMoments: one-pass per-layer statistics

def moments_of(H, y, C, batch=37):
    """A ClassMoments fed H in batches of `batch` rows (uneven class counts per batch, a short last one)."""
    H, y = torch.from_numpy(np.asarray(H)), torch.from_numpy(np.asarray(y))  # on the CPU whatever the default
    moments = ClassMoments(C, H.shape[1], "cpu")
    for start in range(0, len(y), batch):
        moments.add(H[start:start + batch], y[start:start + batch])
    return moments


def design_layer_metrics(H, y):
    """DESIGN.md's metrics of LAYER_METRIC_KEYS (those that need no classifier)."""
    C = int(np.max(y)) + 1
    W = np.random.default_rng(0).normal(size=(C, np.shape(H)[1]))  # any: no layer metric reads it
    return {key: value for key, value in design_metrics(H, y, W).items() if key in LAYER_METRIC_KEYS}


@pytest.mark.parametrize("seed", SEEDS)
def test_class_moments_agree_with_design_formulas(seed):
    # Also a class with a single sample (present, its mean is that sample) and a class absent from y.
    # One pass subtracts sum_c n_c mu_c mu_c^T from sum_i h_i h_i^T: float64 cancellation of about
    # eps |h|^2 / tr(Sigma_W), 1e-14 here, far below AGREEMENT_RTOL.
    H, y, _, _ = clustered(seed)
    single = np.flatnonzero(y == 3)[0]
    keep = (y != 3) | (np.arange(len(y)) == single)
    H, y = H[keep], y[keep]
    moments = moments_of(H, y, 6)
    got = moments.metrics()
    assert got["num_samples"] == len(y) and got["num_classes_present"] == 5 and got["nan_reasons"] == {}
    assert_agrees(got, design_layer_metrics(H, y))
    means = moments.class_means().numpy()
    np.testing.assert_allclose(means[:5], design_class_means(H, y, 5), rtol=1e-13)
    np.testing.assert_array_equal(means[3], H[single])
    assert np.isnan(means[5]).all()


def test_class_moments_of_two_classes():
    H, y, _, _ = clustered(40)
    two = y < 2
    got = moments_of(H[two], y[two], 5).metrics()
    assert got["num_classes_present"] == 2 and got["nan_reasons"] == {}
    assert_agrees(got, design_layer_metrics(H[two], y[two]))


def test_class_moments_of_many_classes_in_few_dimensions():
    # G has rank 3 and 97 eigenvalues of rounding noise: the cut-off (relative, growing with P)
    # drops them; a cut-off P^2 times lower keeps some here, and nc1 picks up their inverses.
    H, y, _, _ = clustered(0, n=1000, d=3, C=100)
    assert_agrees(moments_of(H, y, 100, batch=128).metrics(), design_layer_metrics(H, y))


def test_class_moments_drop_a_between_class_direction_below_the_cut_off():
    # Ten class means spread in three directions, and a fourth at 1e-14 of the largest eigenvalue of
    # G: between the cut-off (P 64 eps = 1.4e-13 of it) and one P^2 times lower. The pseudo-inverse
    # (rcond 1e-10) treats it as zero; keeping it would divide the within-class spread along it by 1e-14.
    rng = np.random.default_rng(5)
    C, d, per_class = 10, 5, 30
    means = np.zeros((C, d))
    means[:, :3] = 2.0 * rng.normal(size=(C, 3))
    means[:, 3] = rng.normal(size=C)
    centred = means - means.mean(axis=0)
    eigvals = np.linalg.eigvalsh(centred @ centred.T)
    means[:, 3] *= np.sqrt(1e-14 * eigvals.max() / (centred[:, 3] @ centred[:, 3]))
    y = np.repeat(np.arange(C), per_class)
    noise = 0.5 * rng.normal(size=(C, per_class, d))
    noise -= noise.mean(axis=1, keepdims=True)  # the sample means are the planted means, to rounding
    H = means[y] + noise.reshape(C * per_class, d)
    got = moments_of(H, y, C).metrics()
    assert got["nc1"] < 1e3  # 7e11 with the fourth direction kept
    assert_agrees(got, design_layer_metrics(H, y))


def test_class_moments_count_non_finite_rows_over_every_batch():
    H, y, _, _ = clustered(41, n=90)
    H = H.copy()
    bad = [4, 50]  # in the first and the second of three batches; the last batch is clean
    H[bad, 1] = [math.nan, -math.inf]
    moments = moments_of(H, y, 5, batch=37)
    got = moments.metrics()
    assert got["nan_reasons"] == {key: "2 feature rows are non-finite" for key in LAYER_METRIC_KEYS}
    assert all(math.isnan(got[key]) for key in LAYER_METRIC_KEYS)
    finite = np.isfinite(H).all(axis=1)
    assert got["num_samples"] == int(finite.sum())
    np.testing.assert_allclose(moments.class_means().numpy(), design_class_means(H[finite], y[finite], 5), rtol=1e-13)


def test_class_moments_without_samples_or_with_a_single_class():
    nothing = ClassMoments(4, 3, "cpu").metrics()
    assert nothing["num_samples"] == 0 and nothing["num_classes_present"] == 0
    assert nothing["nan_reasons"] == {key: "no samples" for key in LAYER_METRIC_KEYS}
    assert all(math.isnan(nothing[key]) for key in LAYER_METRIC_KEYS)
    fewer = {key: "fewer than two classes present" for key in LAYER_METRIC_KEYS}
    one_sample = moments_of(np.array([[1.0, 2.0, 3.0]]), np.array([2]), 4).metrics()
    assert one_sample["num_samples"] == 1 and one_sample["nan_reasons"] == fewer
    H, y, _, _ = clustered(42)
    one_class = moments_of(H[y == 1], y[y == 1], 5).metrics()
    assert one_class["num_classes_present"] == 1 and one_class["nan_reasons"] == fewer
    assert all(math.isnan(one_class[key]) for key in LAYER_METRIC_KEYS)


def test_class_moments_of_coinciding_class_means():
    # Integer features (exact sums): every class mean is (1, 0), the spreads differ.
    H = np.array([[2, 0], [0, 0], [1, 3], [1, -3], [1, 1], [1, -1]], dtype=np.float64)
    y = np.repeat(np.arange(3), 2)
    got = moments_of(H, y, 3, batch=4).metrics()
    keys = ("nc1", "nc1_cdnv", "nc2_equinorm_h", "nc2_equiangle_h", "nc2_maxangle_h", "nc2_etf_h")
    assert got["nan_reasons"] == {key: "all class means coincide (Sigma_B = 0)" for key in keys}
    assert all(math.isnan(got[key]) for key in keys)
    assert got["tr_sigma_b"] == 0.0 and got["tr_sigma_w"] == pytest.approx((2 + 18 + 2) / 6, rel=1e-15)


def test_class_moments_of_two_coinciding_means_among_four_make_only_cdnv_nan():
    H = np.array([[2, 1, 0], [0, -1, 0], [1, 1, 1], [1, -1, -1],
                  [-1, 2, 0], [-1, 0, 0], [0, -3, 1], [0, -1, -1]], dtype=np.float64)
    y = np.repeat(np.arange(4), 2)
    got = moments_of(H, y, 4, batch=3).metrics()
    assert math.isnan(got["nc1_cdnv"]) and got["nan_reasons"] == {"nc1_cdnv": "two class means coincide"}
    with np.errstate(divide="ignore"):  # the design's cdnv divides by the zero distance
        expected = design_layer_metrics(H, y)
    del expected["nc1_cdnv"]
    assert_agrees(got, expected)


def test_class_moments_of_a_class_mean_at_the_global_mean():
    H = np.array([[-2, 1], [-2, -1], [2, 2], [2, -2], [0, 3], [0, -3]], dtype=np.float64)
    y = np.repeat(np.arange(3), 2)
    got = moments_of(H, y, 3, batch=4).metrics()
    h_keys = [f"nc2_{name}_h" for name in ("equinorm", "equiangle", "maxangle", "etf")]
    assert got["nan_reasons"] == {key: "a class-mean row is zero" for key in h_keys}
    assert all(math.isnan(got[key]) for key in h_keys)
    with np.errstate(invalid="ignore"):  # the design's cosines divide by the zero norm
        expected = {key: value for key, value in design_layer_metrics(H, y).items() if key not in h_keys}
    assert_agrees(got, expected)


def test_class_moments_make_no_tensor_on_the_default_device():
    H, y, _, _ = clustered(43, n=120)
    with torch.device(DEFAULT_ELSEWHERE):
        moments = moments_of(H, y, 5)
        got = moments.metrics()
        means = moments.class_means()
    assert means.device == torch.device("cpu")
    assert_agrees(got, design_layer_metrics(H, y))


def test_mixup_geometry_with_pairs_measures_the_chord_of_different_class_pairs_only():
    """With `pair`, diff_class_chord_nonlinearity: against a direct loop over the different-class mixed
    points, each measured against its own pair's clean ends (lam = 1, lam = 0); the same-class pairs,
    bent differently, are left out."""
    rng = np.random.default_rng(31)
    C, d, pairs = 3, 4, 6
    y_a, y_b = np.array([0, 1, 2, 0, 1, 2]), np.array([1, 2, 0, 0, 1, 1])  # pairs 3 and 4 same-class
    lambdas = np.array([1.0, 0.0, 0.25, 0.6])
    lam = np.repeat(lambdas, pairs)
    pair = np.tile(np.arange(pairs), len(lambdas))
    H = rng.normal(size=(len(lam), d))
    H[3 * pairs:] *= 5.0  # the last lambda's points far off: a large, different measure
    means, W = rng.normal(size=(C, d)), rng.normal(size=(C, d))
    out = mixup_geometry(torch.tensor(H), torch.tensor(y_a[pair]), torch.tensor(y_b[pair]), torch.tensor(lam),
                         torch.tensor(means), torch.tensor(W), pair=torch.tensor(pair))
    ratios = []
    for i in range(len(lam)):
        if 0 < lam[i] < 1 and y_a[pair[i]] != y_b[pair[i]]:
            h_a = H[(pair == pair[i]) & (lam == 1.0)][0]
            h_b = H[(pair == pair[i]) & (lam == 0.0)][0]
            chord = lam[i] * h_a + (1 - lam[i]) * h_b
            ratios.append(np.linalg.norm(H[i] - chord) / np.linalg.norm(h_a - h_b))
    assert len(ratios) == 8
    assert out["diff_class_chord_nonlinearity"] == pytest.approx(np.mean(ratios), rel=1e-12)


def test_between_class_pinv_factor_keeps_a_small_but_genuine_direction():
    """P = 3 centred means in d = 200 with singular values 1 and 1e-6: Sigma_B has rank 2 (numpy's
    matrix_rank), the 1e-12 eigenvalue of M M^T is far above rounding and kept, and A A^T is
    (M^T M)^+ from numpy's pinv of M."""
    from collapse_metrics import _between_class_pinv_factor
    rng = np.random.default_rng(32)
    u = np.array([[1.0, -1.0, 0.0], [1.0, 1.0, -2.0]]).T / np.array([np.sqrt(2.0), np.sqrt(6.0)])
    v, _ = np.linalg.qr(rng.normal(size=(200, 2)))
    M = u @ np.diag([1.0, 1e-6]) @ v.T
    assert np.linalg.matrix_rank(M) == 2
    gram, A = _between_class_pinv_factor(torch.tensor(M))
    np.testing.assert_allclose(gram.numpy(), M @ M.T, rtol=0, atol=1e-15)
    assert A.shape == (200, 2)
    pinv = np.linalg.pinv(M)
    np.testing.assert_allclose((A @ A.T).numpy(), pinv @ pinv.T, rtol=0, atol=1e-3 * np.abs(pinv @ pinv.T).max())
