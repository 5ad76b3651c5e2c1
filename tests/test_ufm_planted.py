"""ufm.fit recovers what is planted (issue 20): features made exactly from the UFM optimum, with a
learned classifier and bias or a fixed simplex ETF and no bias, give back s and gamma with no
residual; within-target noise gives its own floor and leaves the shape's residual at zero; and the
nearest simplex ETF, the paper's benchmark classifier, is what orthogonal Procrustes says."""
import math

import numpy as np
import pytest
import torch
from scipy.linalg import orthogonal_procrustes

import ufm
from collapse_metrics import chord_nonlinearity, diff_class_nonlinearity, nearest_simplex_etf, simplex_etf
from test_ufm import ALL_LOSSES, etf_classifier, mixup_targets, random_classifier, spectral_sq

PLANTED_SCALE = 2.5
RELATIVE_GAMMA = 0.3  # gamma = 0.3 s_max^2, issue 20's planted case
C, D = 6, 10
CLASSIFIERS = {
    "learned": lambda: random_classifier(C, D, seed=3, bias=0.3),
    "etf": lambda: etf_classifier(C, D, seed=3),
}
# With a simplex ETF and no bias, mse and smooth_l1's optimum keeps one shape for every gamma (only s H* is
# identifiable), and mae's is h = 0 (the rows sum to zero): nothing to fit.
NOT_IDENTIFIABLE = {("etf", "mse"), ("etf", "smooth_l1")}
ZERO_OPTIMUM = {("etf", "mae")}


def planted_case(kind, loss_name):
    W, b = CLASSIFIERS[kind]()
    T = mixup_targets(C, lambdas=np.linspace(0, 1, 6), repeats=3)
    gamma = RELATIVE_GAMMA * spectral_sq(W)
    return W, b, T, gamma, PLANTED_SCALE * ufm.optimal_features(W, b, T, loss_name, gamma)


@pytest.mark.parametrize("kind", sorted(CLASSIFIERS))
@pytest.mark.parametrize("loss_name", ALL_LOSSES)
def test_an_exact_optimum_comes_back(kind, loss_name):
    W, b, T, gamma, H = planted_case(kind, loss_name)
    metrics, H_fit = ufm.fit(H, T, W, b, loss_name)
    if (kind, loss_name) in ZERO_OPTIMUM:
        assert metrics["nan_reason"] == ("the optimum is h = 0 for every target at every gamma (e.g. mae with a "
                                         "classifier whose rows sum to zero and no bias): no shape to fit")
        return
    assert metrics["nan_reason"] is None and metrics["residual"] < 1e-6
    assert metrics["scatter_floor"] < 1e-12 and metrics["shape_residual"] < 1e-6
    assert float((H_fit - H).norm() / H.norm()) < 1e-6
    if (kind, loss_name) in NOT_IDENTIFIABLE:
        assert metrics["identifiable"] is False and metrics["gamma"] is None
        return
    assert metrics["identifiable"] and not metrics["gamma_at_bound"]
    assert metrics["gamma"] == pytest.approx(gamma, rel=1e-2)
    assert metrics["scale"] == pytest.approx(PLANTED_SCALE, rel=1e-6)


@pytest.mark.parametrize("units, mse_scale", [(1e-3, 1.0), (1e3, 1.0), (1.0, 1e4)])
def test_a_zero_optimum_is_recognised_in_any_units_of_the_classifier(units, mse_scale):
    """mae with a simplex ETF and no bias: h* = 0 for every target (up to the rounding of -W^T u / gamma,
    which scales with W, and with the targets' scale where it exceeds 1), whatever the units of W and
    the targets, whatever features are offered."""
    W, b, T, _, _ = planted_case("etf", "mae")
    H = torch.randn(T.shape[0], D, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    metrics, _ = ufm.fit(H @ row_space_basis(W).T @ row_space_basis(W), T, units * W, b, "mae", mse_scale=mse_scale)
    assert metrics["nan_reason"].startswith("the optimum is h = 0 for every target at every gamma")


def row_space_basis(W):
    """(r, d) orthonormal rows spanning the row space of W (a simplex ETF has rank C - 1)."""
    _, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return Vh[S > 1e-10 * S[0]]


def within_target_noise(H, T, size, seed):
    """Noise inside the row space whose mean over the rows of each target is zero, scaled to `size` |H|."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(H.shape, generator=g, dtype=torch.float64)
    _, group = torch.unique(T, dim=0, return_inverse=True)
    means = torch.zeros(int(group.max()) + 1, H.shape[1], dtype=torch.float64).index_add_(0, group, noise)
    noise -= (means / torch.bincount(group).double()[:, None])[group]
    return noise * size * H.norm() / noise.norm()


@pytest.mark.parametrize("kind, loss_name", [("learned", "cross_entropy"), ("learned", "mse"),
                                             ("learned", "mae"), ("etf", "focal")])
def test_within_target_noise_sets_the_floor_and_leaves_the_shape(kind, loss_name):
    """The planted optimum plus noise that averages to zero over each target's rows: the fit is the same
    (the per-target means are the optimum's), the floor is the noise's share of |P H|, the shape's
    residual stays at zero, and residual^2 = floor^2 + shape^2 (1 - floor^2)."""
    W, b, T, gamma, H = planted_case(kind, loss_name)
    row_space = row_space_basis(W)
    noise = within_target_noise(H, T, 0.4, seed=5) @ row_space.T @ row_space
    metrics, _ = ufm.fit(H + noise, T, W, b, loss_name)
    floor = float(noise.norm() / (H + noise).norm())  # H and its noise both lie in the row space
    assert metrics["scatter_floor"] == pytest.approx(floor, rel=1e-9)
    assert metrics["shape_residual"] < 1e-6
    assert metrics["residual"] == pytest.approx(floor, rel=1e-6)
    assert metrics["gamma"] == pytest.approx(gamma, rel=1e-2)
    identity = metrics["scatter_floor"] ** 2 + metrics["shape_residual"] ** 2 * (1 - metrics["scatter_floor"] ** 2)
    assert metrics["residual"] ** 2 == pytest.approx(identity, rel=1e-9)


@pytest.mark.parametrize("loss_name", ["cross_entropy", "mae"])
def test_the_fit_does_not_depend_on_the_features_units(loss_name):
    """Features in units a thousand times smaller (|P H|^2 far below 1) or larger: the same gamma, and
    the same residual, floor and shape residual, whose ratios have no units."""
    W, b, T, gamma, H = planted_case("learned", loss_name)
    moved = torch.randn(H.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    H = H + within_target_noise(H, T, 0.3, seed=6) + 0.1 * moved * H.norm() / moved.norm()  # the means move too
    reference, _ = ufm.fit(H, T, W, b, loss_name)
    assert reference["shape_residual"] > 1e-3  # not an exact optimum: every ratio has something to measure
    for units in (1e-3, 1e3):
        metrics, _ = ufm.fit(units * H, T, W, b, loss_name)
        for key in ("residual", "scatter_floor", "shape_residual", "gamma"):
            assert metrics[key] == pytest.approx(reference[key], rel=1e-9), (units, key)
        assert metrics["scale"] == pytest.approx(units * reference["scale"], rel=1e-9)


def test_features_whose_target_means_vanish_leave_no_shape_to_fit():
    """Each target's rows scattered around zero: all of P H is within-target scatter, the floor is 1, the
    best multiple of any optimum is s = 0 (residual 1), and the shape residual, a ratio to the means' size,
    has nothing to measure: NaN, not a division by zero."""
    W, b, T, _, H = planted_case("learned", "cross_entropy")  # repeats=3: a target's rows are adjacent
    half = torch.randn(T.shape[0] // 3, D, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    half = half @ row_space_basis(W).T @ row_space_basis(W)
    scatter = torch.stack([half, -half, torch.zeros_like(half)], dim=1).reshape(-1, D)  # +v, -v, 0: means exactly 0
    metrics, H_fit = ufm.fit(scatter, T, W, b, "cross_entropy")
    assert metrics["scatter_floor"] == pytest.approx(1.0, rel=1e-12)
    assert metrics["residual"] == pytest.approx(1.0, rel=1e-12) and metrics["scale"] == 0.0
    assert math.isnan(metrics["shape_residual"]) and metrics["nan_reason"] is None
    assert not bool(H_fit.any())


def test_an_offset_is_part_of_the_features_the_optimum_must_explain():
    """One convention (uncentred): a common offset inside the row space is not subtracted, so the optimum
    plus an offset no longer fits exactly; outside the row space it is ignored as before."""
    W, b, T, gamma, H = planted_case("learned", "cross_entropy")
    row_space = row_space_basis(W)
    offset = torch.randn(D, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    inside = offset @ row_space.T @ row_space
    outside = offset - inside
    moved, _ = ufm.fit(H + 0.5 * H.norm(dim=1).mean() * inside / inside.norm(), T, W, b, "cross_entropy")
    assert moved["shape_residual"] > 1e-2
    ignored, _ = ufm.fit(H + outside, T, W, b, "cross_entropy")
    assert ignored["residual"] < 1e-6 and ignored["outside_share"] > 0


# ---------------------------------------------------------------- the benchmark classifier

def test_nearest_simplex_etf_of_an_etf_is_itself():
    W = 3.0 * simplex_etf(5, 9, torch.Generator().manual_seed(11))
    torch.testing.assert_close(nearest_simplex_etf(W), W, rtol=0, atol=1e-12)


@pytest.mark.parametrize("C_, d", [(5, 9), (5, 4), (10, 10)])
def test_nearest_simplex_etf_is_the_procrustes_rotation_of_a_standard_etf(C_, d):
    """Against scipy's orthogonal_procrustes on the standard ETF padded to d columns: the same rows,
    an ETF's Gram matrix, W's mean row norm; and no other rotation of the ETF lies nearer to W."""
    W = torch.randn(C_, d, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    etf = nearest_simplex_etf(W).numpy()
    standard = np.eye(C_) - 1.0 / C_
    standard /= np.linalg.norm(standard, axis=1, keepdims=True)
    padded = np.zeros((C_, max(C_, d)))
    padded[:, :C_] = standard
    target = np.zeros((C_, max(C_, d)))
    target[:, :d] = W.numpy()
    rotation, _ = orthogonal_procrustes(padded, target)
    scale = float(W.norm(dim=1).mean())
    reference = (padded @ rotation)[:, :d] * scale
    if d >= C_:  # (with d = C - 1 the padded problem has other maximisers)
        np.testing.assert_allclose(etf, reference, rtol=0, atol=1e-10)
    gram = etf @ etf.T / scale ** 2
    np.testing.assert_allclose(gram, C_ / (C_ - 1) * (np.eye(C_) - 1.0 / C_), rtol=0, atol=1e-10)
    for seed in range(5):  # random rotations of the same ETF are no nearer
        other = simplex_etf(C_, d, torch.Generator().manual_seed(seed)).numpy() * scale
        assert np.linalg.norm(etf - W.numpy()) <= np.linalg.norm(other - W.numpy()) + 1e-12


def test_nearest_simplex_etf_needs_room_for_the_simplex_and_a_finite_classifier():
    """Too many classes for d, or too few for a simplex, and a NaN or an infinity: each error says which."""
    for C_ in (6, 1):
        with pytest.raises(ValueError, match=f"^a simplex ETF of {C_} classes needs 2 <= C <= d \\+ 1 \\(d = 4\\)$"):
            nearest_simplex_etf(torch.randn(C_, 4))
    for bad in (math.nan, math.inf):
        W = torch.randn(4, 6)
        W[1, 2] = bad
        with pytest.raises(ValueError, match="^W is not finite$"):
            nearest_simplex_etf(W)


# ---------------------------------------------------------------- the chord non-linearity

def test_chord_nonlinearity_is_zero_for_linear_pairs_whatever_their_scatter():
    """Clean ends scattered far from their class means, mixed points exactly on each pair's chord: the
    chord measure is 0, the class-mean measure is not (issue 20: it reads within-class spread)."""
    g = torch.Generator().manual_seed(13)
    means = torch.randn(3, 5, generator=g, dtype=torch.float64)
    pairs, lambdas = 4, torch.linspace(0, 1, 5, dtype=torch.float64)
    y_a, y_b = torch.zeros(pairs, dtype=torch.long), torch.ones(pairs, dtype=torch.long)
    h_a = means[0] + 0.5 * torch.randn(pairs, 5, generator=g, dtype=torch.float64)
    h_b = means[1] + 0.5 * torch.randn(pairs, 5, generator=g, dtype=torch.float64)
    lam = lambdas.repeat_interleave(pairs)  # lambda-major, as feature_capture's grid
    pair = torch.arange(pairs).repeat(len(lambdas))
    H = lam[:, None] * h_a[pair] + (1 - lam[:, None]) * h_b[pair]
    assert chord_nonlinearity(H, pair, lam) < 1e-15
    assert diff_class_nonlinearity(H, y_a[pair], y_b[pair], lam, means) > 0.1
    # bent by a known amount: each mixed point moved off its chord by 0.3 |h_a - h_b| (a direction orthogonal
    # to the chord does not matter for the norm): the measure is 0.3
    direction = torch.randn(pairs, 5, generator=g, dtype=torch.float64)
    direction /= direction.norm(dim=1, keepdim=True)
    mixed = (lam > 0) & (lam < 1)
    bent = H.clone()
    bent[mixed] += 0.3 * (h_a - h_b)[pair[mixed]].norm(dim=1, keepdim=True) * direction[pair[mixed]]
    assert chord_nonlinearity(bent, pair, lam) == pytest.approx(0.3, rel=1e-12)
    # no point left by the mask, or no pair with both ends: NaN
    assert math.isnan(chord_nonlinearity(bent, pair, lam, mask=torch.zeros_like(mixed)))
    assert math.isnan(chord_nonlinearity(bent[lam < 1], pair[lam < 1], lam[lam < 1]))


# ---------------------------------------------------------------- edge cases that mutation testing found untested (issue 16)

@pytest.mark.parametrize("d", [1, 3])
def test_nearest_simplex_etf_of_two_classes_is_the_antipodal_pair_along_their_difference(d):
    """C = 2 is allowed (2 <= C <= d + 1): the 2-class simplex is +-u; the nearest one puts u along
    w_0 - w_1 (the rotation maximising <M R, W>), scaled to W's mean row norm."""
    W = torch.randn(2, d, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    u = (W[0] - W[1]) / (W[0] - W[1]).norm()
    expected = torch.stack([u, -u]) * W.norm(dim=1).mean()
    torch.testing.assert_close(nearest_simplex_etf(W), expected, rtol=0, atol=1e-12)


def test_nearest_simplex_etf_rows_have_w_mean_row_norm_even_for_a_rank_deficient_w():
    """Rows scaled to W's mean row norm whatever W: here C = 3, d = 2 and W of rank 1 (its centred rows
    span one line), where the rotation is not unique."""
    W = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    norms = nearest_simplex_etf(W).norm(dim=1)
    torch.testing.assert_close(norms, torch.full((3,), 2.0 / 3.0, dtype=torch.float64), rtol=0, atol=1e-12)


def test_chord_nonlinearity_of_nothing_is_nan():
    assert math.isnan(chord_nonlinearity(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), torch.zeros(0)))


def test_chord_nonlinearity_leaves_out_pairs_with_equal_ends_and_keeps_short_chords():
    """Pair 0 has equal ends (no chord: left out, though its mixed point is off them); pair 1 a chord of
    length 0.01 with its mixed point 0.3 of that length off the chord: the measure is 0.3."""
    h = torch.tensor([[1.0, 2.0, 0.0], [1.0, 2.0, 0.0], [5.0, 5.0, 5.0],      # pair 0: ends, mixed point
                      [0.0, 0.0, 0.0], [0.01, 0.0, 0.0], [0.005, 0.003, 0.0]],  # pair 1: h_a, h_b, lam = 1/2
                     dtype=torch.float64)
    pair = torch.tensor([0, 0, 0, 1, 1, 1])
    lam = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.5], dtype=torch.float64)
    assert chord_nonlinearity(h, pair, lam) == pytest.approx(0.3, rel=1e-12)
