"""ufm: the mixup UFM optimum against closed forms, scipy.optimize in the full feature space and
optimality conditions, the facts of issue 13, and the fit on features planted from a known (s, gamma)."""
import math
import re

import numpy as np
import pytest
import torch
from scipy.optimize import brentq, linprog, minimize, minimize_scalar

import ufm
from collapse_metrics import simplex_etf
from losses import LOSSES, build_loss
from mixup import triple_pair_types

SCIPY_RTOL = 1e-6    # issue 13: the solver against scipy.optimize, relative
EXACT_RTOL = 1e-9    # against a closed form or an exactly solvable condition
LAMBDAS = np.linspace(0.0, 1.0, 6)
# (loss, options): every differentiable loss, with the options that change its optimum
SMOOTH_CASES = [
    ("cross_entropy", {}),
    ("cross_entropy", {"label_smoothing": 0.1}),
    ("focal", {"focal_gamma": 2.0}),
    ("focal", {"focal_gamma": 0.5, "label_smoothing": 0.05}),
    ("smooth_l1", {}),
    ("smooth_l1", {"mse_scale": 3.0, "label_smoothing": 0.1}),
]
ALL_LOSSES = ["cross_entropy", "focal", "smooth_l1", "mse", "mae"]


def random_classifier(C, d, seed, bias=0.5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(C, d, generator=g, dtype=torch.float64), bias * torch.randn(C, generator=g, dtype=torch.float64)


def mixup_targets(C, triple=(0, 1, 2), lambdas=LAMBDAS, repeats=1):
    """(n, C) float64 lam e_a + (1 - lam) e_b over the triple's six pair types (issue 13's layout)."""
    eye = np.eye(C)
    rows = [lam * eye[a] + (1 - lam) * eye[b] for a, b in triple_pair_types(triple) for lam in lambdas
            for _ in range(repeats)]
    return torch.tensor(np.array(rows))


def spectral_sq(W):
    return float(np.linalg.norm(np.asarray(W), 2)) ** 2


def relative(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def null_projector(W):
    """I - W^+ W: the projection onto the complement of the row space of W."""
    W = np.asarray(W)
    return np.eye(W.shape[1]) - np.linalg.pinv(W) @ W


def scipy_optimum(W, b, T, loss_name, gamma, **options):
    """argmin over all of R^{n x d} of sum_i l(W h_i + b, t_i) + gamma/2 |h_i|^2, by BFGS from 0 with
    autograd's gradient of losses.build_loss: no row-space reduction, no unique targets, no Newton."""
    loss = build_loss(loss_name, **options)
    n, d = T.shape[0], W.shape[1]

    def objective(flat):
        h = torch.tensor(flat.reshape(n, d), requires_grad=True)
        value = loss(h @ W.T + b, T) * n + 0.5 * gamma * h.square().sum()
        value.backward()
        return value.item(), h.grad.numpy().ravel()

    result = minimize(objective, np.zeros(n * d), jac=True, method="BFGS", options={"gtol": 1e-11, "maxiter": 20000})
    return result.x.reshape(n, d)


def mse_formula(W, b, T, gamma, mse_scale=1.0, label_smoothing=0.0):
    """Issue 13's closed form (W^T W + gamma I)^-1 W^T (kappa t~ - b), in R^d, by numpy."""
    W, b, T = (np.asarray(v) for v in (W, b, T))
    smoothed = (1 - label_smoothing) * T + label_smoothing / T.shape[1]
    return np.linalg.solve(W.T @ W + gamma * np.eye(W.shape[1]), W.T @ (mse_scale * smoothed - b).T).T


# ---------------------------------------------------------------- the solvers

@pytest.mark.parametrize("shape", [(5, 7), (6, 4)])  # C < d, and C > d: W has a null space in logit space
@pytest.mark.parametrize("options", [{}, {"mse_scale": 2.5, "label_smoothing": 0.1}])
def test_mse_closed_form_and_newton_path_match_the_formula(shape, options):
    W, b = random_classifier(*shape, seed=1)
    T = mixup_targets(shape[0])
    gamma = 0.3 * spectral_sq(W)
    expected = mse_formula(W, b, T, gamma, **options)
    assert relative(ufm.optimal_features(W, b, T, "mse", gamma, **options), expected) < EXACT_RTOL
    assert relative(ufm.newton_features(W, b, T, "mse", gamma, **options), expected) < EXACT_RTOL


@pytest.mark.parametrize("loss_name, options", SMOOTH_CASES)
@pytest.mark.parametrize("shape, seed", [((5, 7), 2), ((6, 4), 3)])
def test_differentiable_losses_match_scipy_in_the_full_space(loss_name, options, shape, seed):
    W, b = random_classifier(*shape, seed=seed)
    T = mixup_targets(shape[0], lambdas=np.array([0.0, 0.3, 0.7]))
    gamma = 0.05 * spectral_sq(W)
    reference = scipy_optimum(W, b, T, loss_name, gamma, **options)
    ours = ufm.optimal_features(W, b, T, loss_name, gamma, **options).numpy()
    for row, expected in zip(ours, reference):
        assert relative(row, expected) < SCIPY_RTOL
    # scipy searched all of R^d: its optimum lying in the row space justifies the reduction
    assert np.linalg.norm(reference @ null_projector(W)) < SCIPY_RTOL * np.linalg.norm(reference)


@pytest.mark.parametrize("loss_name, options", [("cross_entropy", {"label_smoothing": 0.1}),
                                                ("focal", {"focal_gamma": 2.0}),
                                                ("focal", {"focal_gamma": 0.5, "label_smoothing": 0.2})])
def test_logit_hessian_of_the_softmax_losses_matches_autograd(loss_name, options):
    """Newton's curvature (which sets its speed, not its answer) against autograd's Hessian of the loss."""
    W, b = random_classifier(5, 7, seed=4)
    T = mixup_targets(5, lambdas=np.array([0.0, 0.4]))
    problem = ufm.problem._problem(W, b, T, loss_name, options)
    z = torch.randn(problem.targets.shape[0], 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 3
    diagonal, left, right = ufm.objective._logit_curvature(problem, z, problem.smoothed)
    ours = torch.diag_embed(diagonal) - left @ right.mT
    loss = build_loss(loss_name, **options)
    leaf = z.clone().requires_grad_()
    gradient, = torch.autograd.grad(loss(leaf, problem.targets) * len(z), leaf, create_graph=True)
    # rows are independent: column k of every row's Hessian is the gradient of the k-th entry's sum
    expected = torch.stack([torch.autograd.grad(gradient[:, k].sum(), leaf, retain_graph=True)[0]
                            for k in range(z.shape[1])], dim=2)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)


def test_mae_optimum_is_the_clipped_target_for_an_orthogonal_classifier():
    """W = sigma Q with orthonormal rows, b = 0: the problem separates per logit, min |z - a| + gamma
    z^2 / (2 sigma^2), whose answer is z = clip(a, -sigma^2/gamma, sigma^2/gamma), h = Q^T z / sigma."""
    C, d, sigma, kappa, eps = 5, 8, 2.0, 1.5, 0.1
    Q = torch.linalg.qr(torch.randn(d, C, generator=torch.Generator().manual_seed(6), dtype=torch.float64))[0].T
    T = mixup_targets(C)
    gamma = sigma ** 2 / 0.8  # clips targets above 0.8: some entries of kappa t~ are clipped, others not
    expected_logits = np.clip(kappa * ((1 - eps) * T.numpy() + eps / C), -0.8, 0.8)
    h = ufm.optimal_features(sigma * Q, None, T, "mae", gamma, mse_scale=kappa, label_smoothing=eps)
    np.testing.assert_allclose(h.numpy(), expected_logits @ Q.numpy() / sigma, rtol=0, atol=1e-10)
    clipped = kappa * ((1 - eps) * T.numpy() + eps / C) > 0.8
    assert clipped.any() and (~clipped).any()


def smallest_multipliers(A, rest):
    """The u of A u = rest with the smallest max |u_c|, by linear programming (min s, -s <= u <= s);
    least squares when A has full column rank (the solution is unique then)."""
    if A.shape[1] == 0 or np.linalg.matrix_rank(A) == A.shape[1]:
        return np.linalg.lstsq(A, rest, rcond=None)[0]
    k = A.shape[1]
    bound = np.block([[np.eye(k), -np.ones((k, 1))], [-np.eye(k), -np.ones((k, 1))]])
    result = linprog(np.r_[np.zeros(k), 1.0], A_ub=bound, b_ub=np.zeros(2 * k),
                     A_eq=np.c_[A, np.zeros(len(A))], b_eq=rest, bounds=(None, None), method="highs")
    assert result.status == 0, result.message
    return result.x[:k]


def with_rows(classifier, rows):
    """The classifier with row c of W zeroed (rows[c] None) or a copy of row rows[c] (weights and bias)."""
    W, b = (v.clone() for v in classifier)
    for c, source in rows.items():
        W[c], b[c] = (0.0, b[c]) if source is None else (W[source], b[source])
    return W, b


def etf_classifier(C, d, seed):
    return simplex_etf(C, d, torch.Generator().manual_seed(seed)), torch.zeros(C, dtype=torch.float64)


DEGENERATE_CLASSIFIERS = [
    (lambda: random_classifier(6, 9, seed=7), 0.5),
    (lambda: random_classifier(7, 4, seed=8), 0.5),     # C > d: more logits than feature directions
    (lambda: random_classifier(7, 4, seed=8), 1e-3),
    # no bias: at h = 0 every logit whose target is 0 sits on it, more than the rank of W (a singular piece);
    # the active set cycled here on an AMD EPYC (issue 20): a release that moved x by rounding only
    (lambda: (random_classifier(7, 4, seed=8)[0], torch.zeros(7, dtype=torch.float64)), 1e-3),
    (lambda: etf_classifier(6, 8, seed=9), 0.05),       # rank C - 1, and logits starting on their targets
    (lambda: with_rows(random_classifier(6, 9, seed=40), {3: None}), 0.05),  # a zero row: a logit that never moves
    (lambda: with_rows(random_classifier(6, 9, seed=41), {1: 0}), 0.01),  # two equal classes: a singular piece
    # a zero first row and no bias: logit 0 sits on its target 0 wherever t_0 = 0, and never moves
    (lambda: (with_rows(random_classifier(6, 9, seed=42), {0: None})[0], torch.zeros(6, dtype=torch.float64)), 0.05),
]


def assert_mae_subgradient_condition(W, b, T, gamma, kappa=2.0):
    """0 in the subdifferential: some u in [-1, 1]^C with u_c = sign(r_c) where r_c != 0 and
    gamma h + W^T u = 0 (sufficient for the unique minimiser of a strongly convex objective).
    Returns how many logits sit on their targets."""
    H = ufm.optimal_features(W, b, T, "mae", gamma, mse_scale=kappa).numpy()
    W, b, T = np.asarray(W), np.asarray(b), np.asarray(T)
    on_target_count = 0
    for h, t in zip(H, T):
        r = W @ h + b - kappa * t
        on_target = np.abs(r) <= 1e-9 * np.abs(kappa * t - b).max()
        u = np.sign(r)
        rest = -gamma * h - W[~on_target].T @ u[~on_target]
        u_free = smallest_multipliers(W[on_target].T, rest)
        # (relative to |W|, the size of W^T u for |u| <= 1: h itself may be 0, as for the ETF's one-hot rows)
        assert np.linalg.norm(W[on_target].T @ u_free - rest) <= 1e-9 * np.linalg.norm(W)
        assert np.abs(u_free).max(initial=0.0) <= 1 + 1e-8
        on_target_count += int(on_target.sum())
    return on_target_count


@pytest.mark.parametrize("classifier, relative_gamma", DEGENERATE_CLASSIFIERS)
def test_mae_optimum_satisfies_the_subgradient_condition(classifier, relative_gamma):
    W, b = classifier()
    T = mixup_targets(W.shape[0], lambdas=np.array([0.0, 0.35]))
    on_target_count = assert_mae_subgradient_condition(W, b, T, relative_gamma * spectral_sq(W))
    assert 0 < on_target_count < T.numel()  # both kinds of logits occur: the check is not vacuous


def ulp_perturbed(tensor, generator, ulps=4):
    """Each entry moved by a random whole number of ulps in [-ulps, ulps] (zeros stay zero): the
    difference between two CPUs' last bits, which decided whether the active set cycled."""
    steps = torch.randint(-ulps, ulps + 1, tensor.shape, generator=generator).to(torch.float64)
    return tensor + steps * torch.where(tensor == 0, 0.0, torch.finfo(torch.float64).eps * tensor.abs())


@pytest.mark.parametrize("classifier, relative_gamma", DEGENERATE_CLASSIFIERS)
def test_mae_solver_terminates_at_the_optimum_under_ulp_perturbations(classifier, relative_gamma):
    """Ties (equal rows, zero rows, more logits on their targets than W has rank) and the AMD case,
    each perturbed by a few ulps in W, b and gamma many times: every variant ends certified, never
    cycles (SolverError), and satisfies the subgradient condition."""
    W, b = classifier()
    T = mixup_targets(W.shape[0], lambdas=np.array([0.0, 0.35]))
    generator = torch.Generator().manual_seed(2020)
    gamma = torch.tensor(relative_gamma * spectral_sq(W), dtype=torch.float64)
    for _ in range(12):
        assert_mae_subgradient_condition(ulp_perturbed(W, generator), ulp_perturbed(b, generator), T,
                                         float(ulp_perturbed(gamma, generator)))


@pytest.mark.parametrize("classifier, relative_gamma", DEGENERATE_CLASSIFIERS)
@pytest.mark.parametrize("units", [1e-2, 1e4])
def test_mae_active_set_alone_reaches_the_optimum_in_any_units(monkeypatch, classifier, relative_gamma, units):
    """The one-change-per-step method without the primal-dual steps, which certify most rows before it
    runs: from h = 0 it meets every kind of piece, degenerate ones included. Its blocking and
    degeneracy thresholds are relative to W, the step and gamma, so that W, b and the targets in units
    of 1e-2 or 1e4 (gamma with them) reach the optimum, certified by the subgradient condition. (Below
    1e-2 the targets meet the absolute floor of mae's zero test, ZERO_RTOL max(1, |b - kappa t|): held
    residuals of 1e-12 are then more than this check's relative 1e-9.)"""
    monkeypatch.setattr(ufm.mae, "MAX_PIECE_STEPS", 0)
    W, b = classifier()
    T = mixup_targets(W.shape[0], lambdas=np.array([0.0, 0.35]))
    assert_mae_subgradient_condition(units * W, units * b, T, relative_gamma * spectral_sq(units * W), kappa=2.0 * units)


# ---------------------------------------------------------------- the facts of issue 13

@pytest.mark.parametrize("loss_name", ALL_LOSSES)
def test_same_class_targets_give_lambda_independent_optima(loss_name):
    W, b = random_classifier(5, 7, seed=9)
    lam = np.linspace(0.0, 1.0, 7)[:, None]
    T = torch.tensor(lam * np.eye(5)[2] + (1 - lam) * np.eye(5)[2])
    H = ufm.optimal_features(W, b, T, loss_name, 0.2 * spectral_sq(W)).numpy()
    for row in H[1:]:
        assert relative(row, H[0]) < EXACT_RTOL
    assert np.linalg.norm(H[0]) > 0


@pytest.mark.parametrize("loss_name", ALL_LOSSES)
def test_optimum_lies_in_the_row_space_of_w(loss_name):
    W, b = random_classifier(4, 9, seed=10)
    H = ufm.optimal_features(W, b, mixup_targets(4), loss_name, 0.1 * spectral_sq(W)).numpy()
    assert np.linalg.norm(H @ null_projector(W)) < 1e-12 * np.linalg.norm(H)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_mse_different_class_optimum_is_affine_in_lambda_for_zero_bias(smoothing):
    W, _ = random_classifier(5, 7, seed=11)
    lam = np.linspace(0.0, 1.0, 11)
    T = torch.tensor(lam[:, None] * np.eye(5)[0] + (1 - lam[:, None]) * np.eye(5)[3])
    H = ufm.optimal_features(W, None, T, "mse", 0.2 * spectral_sq(W), label_smoothing=smoothing).numpy()
    chord = lam[:, None] * H[-1] + (1 - lam[:, None]) * H[0]
    assert np.abs(H - chord).max() < EXACT_RTOL * np.abs(H).max()


def test_cross_entropy_different_class_optimum_is_not_affine_in_lambda():
    """The contrast that makes the previous test meaningful: the paper's curves."""
    W, _ = random_classifier(5, 7, seed=11)
    lam = np.linspace(0.0, 1.0, 11)
    T = torch.tensor(lam[:, None] * np.eye(5)[0] + (1 - lam[:, None]) * np.eye(5)[3])
    H = ufm.optimal_features(W, None, T, "cross_entropy", 0.01 * spectral_sq(W)).numpy()
    chord = lam[:, None] * H[-1] + (1 - lam[:, None]) * H[0]
    assert np.linalg.norm(H - chord, axis=1).max() > 0.05 * np.linalg.norm(H[0])


@pytest.mark.parametrize("C, gamma", [(4, 0.05), (10, 1e-3)])
def test_cross_entropy_with_simplex_etf_and_one_hot_target_is_a_multiple_of_the_row(C, gamma):
    """h* = alpha w_a with alpha > 0 solving gamma alpha = (1 - p_a) C/(C-1),
    p_a = 1 / (1 + (C-1) exp(-alpha C/(C-1))) (unit rows, w_a.w_c = -1/(C-1), rows summing to 0)."""
    W = simplex_etf(C, C + 3, torch.Generator().manual_seed(12))
    a = 1
    h = ufm.optimal_features(W, None, torch.eye(C, dtype=torch.float64)[a:a + 1], "cross_entropy", gamma)[0].numpy()
    w = W[a].numpy()
    ratio = C / (C - 1)
    alpha = brentq(lambda v: gamma * v - (1 - 1 / (1 + (C - 1) * math.exp(-v * ratio))) * ratio, 0.0, 1e3, xtol=1e-14)
    assert alpha > 0
    np.testing.assert_allclose(h, alpha * w, rtol=0, atol=EXACT_RTOL * alpha)


# ---------------------------------------------------------------- the fit

def planted(loss_name, W, b, T, gamma, scale, outside_noise, seed, **options):
    """(H, noise, signal): scale H*(gamma) + noise with the noise outside the row space of W (uncentred:
    the UFM's features, see ufm's "One convention")."""
    d = W.shape[1]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(T.shape[0], d, generator=g, dtype=torch.float64) @ torch.tensor(null_projector(W))
    H_star = ufm.optimal_features(W, b, T, loss_name, gamma, **options)
    noise = noise * outside_noise * H_star.norm() / noise.norm()
    return scale * H_star + noise, noise, scale * H_star


@pytest.mark.parametrize("loss_name, options, relative_gamma", [
    ("cross_entropy", {}, 0.02),
    ("cross_entropy", {"label_smoothing": 0.1}, 1e-4),
    ("mse", {"mse_scale": 2.0}, 0.3),
    ("smooth_l1", {}, 0.1),
])
def test_fit_recovers_a_planted_scale_and_gamma(loss_name, options, relative_gamma):
    W, b = random_classifier(4, 10, seed=13, bias=0.2)
    T = mixup_targets(4, lambdas=np.linspace(0, 1, 6), repeats=2)
    gamma = relative_gamma * spectral_sq(W)
    H, noise, signal = planted(loss_name, W, b, T, gamma, 3.0, 0.5, seed=14, **options)
    metrics, H_fit = ufm.fit(H, T, W, b, loss_name, **options)
    assert metrics["identifiable"] and not metrics["gamma_at_bound"]
    assert metrics["gamma"] == pytest.approx(gamma, rel=0.02)
    assert metrics["scale"] == pytest.approx(3.0, rel=0.02)
    assert metrics["residual"] < 1e-3
    share = float(noise.square().sum() / (noise.square().sum() + signal.square().sum()))
    assert metrics["outside_share"] == pytest.approx(share, rel=1e-10)
    assert relative(H_fit, signal) < 1e-3
    assert all(isinstance(v, (float, bool, type(None), list, str)) for v in metrics.values())


@pytest.mark.parametrize("scale", [1e-7, 1e7])
def test_fit_recovers_gamma_from_features_of_any_size(scale):
    """The refinement's flatness test is relative to |P H|^2: features of size 1e-7 (|P H|^2
    ~ 1e-13) or 1e7 are refined as those of size 1."""
    W, b = random_classifier(4, 10, seed=13, bias=0.2)
    T = mixup_targets(4, lambdas=np.linspace(0, 1, 6))
    gamma = 0.02 * spectral_sq(W)
    H, _, _ = planted("cross_entropy", W, b, T, gamma, scale, 0.5, seed=14)
    metrics, _ = ufm.fit(H, T, W, b, "cross_entropy")
    assert metrics["gamma"] == pytest.approx(gamma, rel=0.02) and metrics["scale"] == pytest.approx(scale, rel=0.02)


def test_fit_residuals_are_those_of_the_returned_fit():
    """Residuals by group, recomputed with a numpy projection; H_fit is s H*(gamma) of the public solver."""
    W, b = random_classifier(4, 10, seed=15, bias=0.2)
    T = mixup_targets(4, lambdas=np.linspace(0, 1, 5), repeats=3)
    g = torch.Generator().manual_seed(16)
    H, _, _ = planted("cross_entropy", W, b, T, 0.05 * spectral_sq(W), 2.0, 0.3, seed=16)
    H = H + 0.3 * torch.randn(H.shape, generator=g, dtype=torch.float64)  # also inside the row space
    same = torch.tensor([a == c for a, c in triple_pair_types((0, 1, 2)) for _ in range(5 * 3)])
    metrics, H_fit = ufm.fit(H, T, W, b, "cross_entropy", same_class=same)
    H_star = ufm.optimal_features(W, b, T, "cross_entropy", metrics["gamma"])
    np.testing.assert_allclose(H_fit, metrics["scale"] * H_star, rtol=1e-9, atol=1e-12)
    inside = H.numpy() @ (np.eye(10) - null_projector(W))
    for key, mask in (("residual", np.ones(len(T), bool)), ("residual_same_class", same.numpy()),
                      ("residual_diff_class", ~same.numpy())):
        expected = np.linalg.norm(inside[mask] - H_fit.numpy()[mask]) / np.linalg.norm(inside[mask])
        assert metrics[key] == pytest.approx(expected, rel=1e-9)
    # by default, one-hot targets count as same-class: different-class pairs at lam 0 and 1 too
    default, default_fit = ufm.fit(H, T, W, b, "cross_entropy")
    one_hot = (T.numpy() != 0).sum(axis=1) == 1
    expected = np.linalg.norm(inside[one_hot] - default_fit.numpy()[one_hot]) / np.linalg.norm(inside[one_hot])
    assert default["residual_same_class"] == pytest.approx(expected, rel=1e-9)


def test_fit_least_squares_scale_is_optimal_for_its_gamma():
    W, b = random_classifier(4, 10, seed=17)
    T = mixup_targets(4)
    H, _, _ = planted("cross_entropy", W, b, T, 0.05 * spectral_sq(W), 2.0, 0.0, seed=18)
    H = H + 0.5 * torch.randn(H.shape, generator=torch.Generator().manual_seed(19), dtype=torch.float64)
    metrics, _ = ufm.fit(H, T, W, b, "cross_entropy")
    H_star = ufm.optimal_features(W, b, T, "cross_entropy", metrics["gamma"]).numpy()
    inside = H.numpy() @ (np.eye(10) - null_projector(W))
    assert metrics["scale"] == pytest.approx(np.sum(inside * H_star) / np.sum(H_star ** 2), rel=1e-9)


def test_fit_is_not_identifiable_for_mse_with_a_simplex_etf_and_no_bias():
    """H* = W^T t~ / (C/(C-1) + gamma): every gamma gives the same shape."""
    C = 4
    W = simplex_etf(C, 7, torch.Generator().manual_seed(20))
    T = mixup_targets(C)
    H = 5.0 * (T - 1.0 / C) @ W
    metrics, H_fit = ufm.fit(H, T, W, None, "mse")
    assert metrics["identifiable"] is False and metrics["gamma"] is None and metrics["scale"] is None
    assert metrics["residual"] < 1e-12 and metrics["residual_gamma_spread"] < 1e-12
    np.testing.assert_allclose(H_fit, H, rtol=0, atol=1e-12)
    curve = ufm.theory_curve(W, None, (0, 1), LAMBDAS, "mse", metrics["curve_gamma"], metrics["curve_scale"])
    np.testing.assert_allclose(curve, 5.0 * (mixup_targets(C)[18:24] - 1.0 / C) @ W, rtol=0, atol=1e-12)


def test_fit_flags_a_gamma_at_the_end_of_the_search_range():
    W, b = random_classifier(4, 10, seed=21)
    T = mixup_targets(4)
    H, _, _ = planted("cross_entropy", W, b, T, 1e-3 * spectral_sq(W), 1.0, 0.0, seed=22)
    metrics, _ = ufm.fit(H, T, W, b, "cross_entropy", gamma_range=(1e-1, 1e3))
    assert metrics["gamma_at_bound"] and metrics["identifiable"]
    assert metrics["gamma"] == pytest.approx(0.1 * spectral_sq(W), rel=0.05)
    assert metrics["gamma_range"] == pytest.approx([0.1 * spectral_sq(W), 1e3 * spectral_sq(W)])


@pytest.mark.parametrize("name", ["H", "W", "b", "T"])
def test_fit_reports_non_finite_input_as_nan_with_a_reason(name):
    W, b = random_classifier(4, 10, seed=23)
    inputs = {"H": torch.zeros(24, 10, dtype=torch.float64), "W": W, "b": b, "T": mixup_targets(4, repeats=1)[:24]}
    inputs[name] = inputs[name].clone()
    inputs[name].view(-1)[3] = math.inf if name == "T" else math.nan
    metrics, H_fit = ufm.fit(inputs["H"], inputs["T"], inputs["W"], inputs["b"], "cross_entropy")
    assert metrics["gamma"] is None and math.isnan(metrics["residual"])
    assert metrics["nan_reason"] == f"{name} is not finite"
    assert torch.isnan(H_fit).all()


@pytest.mark.parametrize("loss_name", ["mse", "mae", "cross_entropy", "focal", "smooth_l1"])
def test_no_targets_give_no_features(loss_name):
    W, _ = random_classifier(4, 6, seed=23)
    H = ufm.optimal_features(W, None, torch.zeros(0, 4, dtype=torch.float64), loss_name, 0.3)
    assert H.shape == (0, 6)


def test_a_fit_with_numbers_has_no_nan_reason():
    W, b = random_classifier(4, 10, seed=24)
    T = mixup_targets(4)
    H, _, _ = planted("cross_entropy", W, b, T, 0.05 * spectral_sq(W), 2.0, 0.2, seed=25)
    metrics, _ = ufm.fit(H, T, W, b, "cross_entropy")
    assert set(metrics) == set(ufm.unfitted_metrics("")) and metrics["nan_reason"] is None


def test_fit_works_under_inference_mode_and_with_float32_numpy_input():
    """The feature capture runs under torch.inference_mode and holds float32 features."""
    W, b = random_classifier(4, 10, seed=24)
    T = mixup_targets(4)
    H, _, _ = planted("cross_entropy", W, b, T, 0.05 * spectral_sq(W), 2.0, 0.2, seed=25)
    expected, _ = ufm.fit(H.float().numpy(), T.float(), W.float(), b.float(), "cross_entropy")
    with torch.inference_mode():
        got, H_fit = ufm.fit(H.float(), T.float(), W.float(), b.float(), "cross_entropy")
    assert got == expected and H_fit.dtype == torch.float64
    assert got["gamma"] == pytest.approx(0.05 * spectral_sq(W), rel=0.02)  # float32 features: close, not exact


def test_theory_curve_is_the_scaled_optimum_along_lambda():
    W, b = random_classifier(5, 7, seed=26)
    lam = np.linspace(0.0, 1.0, 9)
    curve = ufm.theory_curve(W, b, (3, 1), lam, "focal", 0.2, 1.7, focal_gamma=1.0)
    T = torch.tensor(lam[:, None] * np.eye(5)[3] + (1 - lam[:, None]) * np.eye(5)[1])
    np.testing.assert_allclose(curve, 1.7 * ufm.optimal_features(W, b, T, "focal", 0.2, focal_gamma=1.0), rtol=1e-12)
    same_class = ufm.optimal_features(W, b, torch.eye(5, dtype=torch.float64)[3:4], "focal", 0.2, focal_gamma=1.0)
    np.testing.assert_allclose(curve[-1], 1.7 * same_class[0], rtol=1e-9)


# ---------------------------------------------------------------- bad input

NAN_W = torch.tensor([[math.nan] * 7] + [[1.0] * 7] * 3, dtype=torch.float64)


@pytest.mark.parametrize("call, message", [  # the whole message: it is what the user reads
    (lambda W, T: ufm.optimal_features(W, None, T, "hinge", 1.0),
     f"unknown loss 'hinge'; choose from {', '.join(LOSSES)}"),
    (lambda W, T: ufm.optimal_features(W, None, T, "focal", 1.0, focal_gama=2.0, mse_scal=1.0),
     "unknown loss option(s) focal_gama, mse_scal; the options are label_smoothing, mse_scale, focal_gamma"),
    (lambda W, T: ufm.optimal_features(W, None, T, "mse", 0.0), "gamma must be a positive finite number, got 0.0"),
    (lambda W, T: ufm.optimal_features(W, None, T[:, :3], "mse", 1.0),
     "W must be (C, d), b (C,) and T (n, C), got (4, 7), (4,) and (36, 3)"),
    (lambda W, T: ufm.optimal_features(W, torch.zeros(3), T, "mse", 1.0),
     "W must be (C, d), b (C,) and T (n, C), got (4, 7), (3,) and (36, 4)"),
    (lambda W, T: ufm.optimal_features(torch.ones(4), None, T, "mse", 1.0),
     "W must be (C, d), b (C,) and T (n, C), got (4,), (4,) and (36, 4)"),
    (lambda W, T: ufm.optimal_features(NAN_W, None, T, "mse", 1.0), "W, b and T must be finite"),
    (lambda W, T: ufm.optimal_features(0 * W, None, T, "mse", 1.0), "W is zero: the optimum is h = 0 for every target"),
    (lambda W, T: ufm.newton_features(W, None, T, "mae", 1.0),
     "mae is not differentiable: its optimum comes from the active-set method, not Newton"),
    (lambda W, T: ufm.fit(torch.zeros(len(T), 6), T, W, None, "mse"),
     "H must be (n, d) = (36, 7), got (36, 6)"),
    (lambda W, T: ufm.fit(torch.zeros(len(T), 7), T, W, None, "mse", same_class=[True]),
     "same_class must be (36,), got (1,)"),
    (lambda W, T: ufm.fit(torch.zeros(len(T), 7), T, W, None, "mse", gamma_range=(1, 1)),
     "gamma_range must be 0 < low < high < inf, got (1, 1)"),
    (lambda W, T: ufm.fit(torch.zeros(len(T), 7), T, W, None, "mse", gamma_range=(0, 1)),
     "gamma_range must be 0 < low < high < inf, got (0, 1)"),
])
def test_bad_input_is_a_clear_value_error(call, message):
    W, _ = random_classifier(4, 7, seed=27)
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        call(W, mixup_targets(4))


# ---------------------------------------------------------------- inputs: where tensors live, what they may be

# With the default device set to 'meta' (no data), a tensor made without the input's device fails
# the first operation that meets a CPU tensor; the tensors made on W's device stay on the CPU.
DEFAULT_ELSEWHERE = "meta"


def test_no_tensor_is_made_on_the_default_device():
    W, b = random_classifier(5, 7, seed=28)
    T = mixup_targets(5)
    gamma = 0.05 * spectral_sq(W)
    expected = {loss: ufm.optimal_features(W, None, T, loss, gamma) for loss in ALL_LOSSES}
    H, _, _ = planted("cross_entropy", W, b, T, gamma, 2.0, 0.2, seed=29)
    fitted, _ = ufm.fit(H, T, W, b, "cross_entropy")
    with torch.device(DEFAULT_ELSEWHERE):
        # b=None: zeros made on W's device
        got = {loss: ufm.optimal_features(W, None, T, loss, gamma) for loss in ALL_LOSSES}
        curve = ufm.theory_curve(W, None, (0, 1), LAMBDAS, "cross_entropy", gamma, 2.0)
        metrics, H_fit = ufm.fit(H, T, W, b, "cross_entropy")
        newton = ufm.newton_features(W, None, T, "cross_entropy", gamma)  # its start h = 0 on W's device
    torch.testing.assert_close(newton, expected["cross_entropy"], rtol=0, atol=1e-10 * float(newton.abs().max()))
    for loss in ALL_LOSSES:
        assert got[loss].device == W.device
        torch.testing.assert_close(got[loss], expected[loss], rtol=0, atol=0)
    torch.testing.assert_close(curve, 2.0 * expected["cross_entropy"][18:24], rtol=1e-12, atol=0)  # pair (0, 1)
    assert H_fit.device == W.device and metrics == fitted


def test_bfloat16_features_are_accepted():
    """Features from a bf16 measurement pass (a dtype numpy has not): exactly their float64 values."""
    W, b = random_classifier(4, 10, seed=30)
    T = mixup_targets(4)
    H, _, _ = planted("cross_entropy", W, b, T, 0.05 * spectral_sq(W), 2.0, 0.2, seed=31)
    H16 = H.bfloat16()
    expected, expected_fit = ufm.fit(H16.double(), T, W, b, "cross_entropy")
    got, H_fit = ufm.fit(H16, T, W, b, "cross_entropy")
    assert got == expected and torch.equal(H_fit, expected_fit)


def test_same_class_may_be_given_as_zeros_and_ones():
    W, b = random_classifier(4, 10, seed=32)
    T = mixup_targets(4)
    H, _, _ = planted("cross_entropy", W, b, T, 0.05 * spectral_sq(W), 2.0, 0.3, seed=33)
    same = np.array([a == c for a, c in triple_pair_types((0, 1, 2)) for _ in LAMBDAS])
    as_bool, _ = ufm.fit(H, T, W, b, "cross_entropy", same_class=torch.from_numpy(same))
    as_int, _ = ufm.fit(H, T, W, b, "cross_entropy", same_class=same.astype(np.int64))
    assert as_int == as_bool and as_bool["residual_same_class"] != as_bool["residual_diff_class"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_classifier_with_the_rest_on_the_cpu():
    """Everything follows W's device: targets, bias, features, same_class and lambdas given on
    the CPU (tensors or numpy) are moved to it, and the results live there."""
    W, b = random_classifier(4, 10, seed=34)
    T = mixup_targets(4)
    H, _, _ = planted("cross_entropy", W, b, T, 0.05 * spectral_sq(W), 2.0, 0.3, seed=35)
    same = torch.tensor([a == c for a, c in triple_pair_types((0, 1, 2)) for _ in LAMBDAS])
    expected, expected_fit = ufm.fit(H, T, W, b, "cross_entropy", same_class=same)
    for loss in ALL_LOSSES:
        got = ufm.optimal_features(W.cuda(), b, T.numpy(), loss, 0.3)
        assert got.is_cuda
        torch.testing.assert_close(got.cpu(), ufm.optimal_features(W, b, T, loss, 0.3), rtol=1e-9, atol=1e-12)
    # The GPU's rounding may move the refinement by more than its tolerance (LOG_GAMMA_XATOL): 0.1 %.
    for mask in (same, same.cuda()):  # the mask on the CPU or already on W's device
        metrics, H_fit = ufm.fit(H.numpy(), T, W.cuda(), b.numpy(), "cross_entropy", same_class=mask)
        assert H_fit.is_cuda and metrics["gamma"] == pytest.approx(expected["gamma"], rel=1e-3)
        for key in ("residual", "residual_same_class", "residual_diff_class", "outside_share"):
            assert metrics[key] == pytest.approx(expected[key], rel=1e-3), key
        torch.testing.assert_close(H_fit.cpu(), expected_fit, rtol=1e-2, atol=1e-6)
    curve = ufm.theory_curve(W.cuda(), b, (0, 1), LAMBDAS, "mse", 0.3, 2.0)
    assert curve.is_cuda and ufm.newton_features(W.cuda(), b, T, "cross_entropy", 0.3).is_cuda


# ---------------------------------------------------------------- the row space of W

def classifier_with_singular_values(values, C=5, d=7, seed=36):
    """(C, d) W = U diag(values) V^T with random orthonormal U, V: a chosen spectrum."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(C, len(values), generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(d, len(values), generator=g, dtype=torch.float64))[0]
    return U @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ V.T, U, V


def test_singular_values_below_the_rank_cut_off_count_as_zero():
    """The module's rule: singular values below RANK_RTOL s_max are zero. 5e-6 against 10 is below
    it (1e-5), so the optimum is the formula's for W without that direction (kept, it would move
    the optimum by about 1e-6 relative, far beyond EXACT_RTOL)."""
    values = (10.0, 1.0, 5e-6)
    W, U, V = classifier_with_singular_values(values)
    truncated = U[:, :2] @ torch.diag(torch.tensor(values[:2], dtype=torch.float64)) @ V[:, :2].T
    b, T = 0.3 * torch.ones(5, dtype=torch.float64), mixup_targets(5)
    expected = mse_formula(truncated, b, T, 3.0)
    assert relative(ufm.optimal_features(W, b, T, "mse", 3.0), expected) < EXACT_RTOL
    assert relative(mse_formula(W, b, T, 3.0), expected) > 1e3 * EXACT_RTOL  # the direction is not negligible


@pytest.mark.parametrize("scale", [1e-8, 1e8])
def test_only_gamma_over_the_norm_of_w_squared_matters(scale):
    """h*(a W, a^2 gamma) = h*(W, gamma) / a (h -> a h turns one problem into the other): a classifier of
    tiny or huge norm keeps its full rank and every tolerance of the solvers scales with it."""
    W, b = random_classifier(5, 7, seed=37)
    T = mixup_targets(5)
    gamma = 0.3 * spectral_sq(W)
    for loss in ALL_LOSSES:
        expected = ufm.optimal_features(W, b, T, loss, gamma) / scale
        got = ufm.optimal_features(scale * W, b, T, loss, gamma * scale ** 2)
        assert relative(got, expected) < EXACT_RTOL, loss
    assert relative(ufm.optimal_features(scale * W, b, T, "mse", gamma * scale ** 2),
                    mse_formula(scale * W, b, T, gamma * scale ** 2)) < EXACT_RTOL


@pytest.mark.parametrize("loss_name", ALL_LOSSES)
def test_a_rank_one_classifier(loss_name):
    """W = s u v^T: h* = alpha v with alpha the minimiser of l(alpha s u + b, t) + gamma alpha^2 / 2,
    a one-dimensional problem solved here by scipy for each target."""
    W, U, V = classifier_with_singular_values((2.0,), seed=38)
    b = 0.2 * torch.arange(5, dtype=torch.float64)
    T = mixup_targets(5, lambdas=np.array([0.0, 0.3]))
    loss = build_loss(loss_name, mse_scale=1.5)
    H = ufm.optimal_features(W, b, T, loss_name, 0.7, mse_scale=1.5)
    for h, t in zip(H, T):
        def objective(alpha):
            return float(loss((alpha * 2.0 * U[:, 0] + b)[None], t[None])) + 0.35 * alpha ** 2
        alpha = minimize_scalar(objective, bounds=(-20, 20), method="bounded", options={"xatol": 1e-12}).x
        np.testing.assert_allclose(h, alpha * V[:, 0], rtol=0, atol=1e-7)


# ---------------------------------------------------------------- the Newton solver's safeguards

def test_newton_matrices_that_are_not_positive_definite_are_shifted_by_powers_of_ten():
    """A row that is not positive definite gets its own penalty P = gamma K^+ + Q (K = W W^T, Q the
    projection onto the complement of W's column space: the identity times gamma in h) times 10^k
    added, k = 0, 1, 2, ... the first that makes it so; a positive definite row is factored as it is.
    P by numpy from W, per row's gamma."""
    W = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0]], dtype=torch.float64)  # C = 3 > rank 2: Q != 0
    problem = ufm.problem._problem(W, None, torch.eye(3, dtype=torch.float64), "cross_entropy", {})
    gamma = torch.tensor([0.7, 0.2, 5.0], dtype=torch.float64)
    Wn = W.numpy()
    penalty = [torch.from_numpy(g * np.linalg.pinv(Wn @ Wn.T) + np.eye(3) - Wn @ np.linalg.pinv(Wn))
               for g in gamma.tolist()]
    definite = torch.tensor([[2.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 1.0]], dtype=torch.float64)
    small = 0.1 * torch.eye(3, dtype=torch.float64)
    # row 1: 1 and 10 times its penalty are not enough, 100 is; row 2: once is enough
    matrix = torch.stack([definite, small - 50.0 * penalty[1], small - 0.5 * penalty[2]])
    expected = torch.stack([torch.linalg.cholesky(definite), torch.linalg.cholesky(small + 50.0 * penalty[1]),
                            torch.linalg.cholesky(small + 0.5 * penalty[2])])
    for row, shift in ((1, 10.0), (2, 0.0)):  # the case this test is about
        assert torch.linalg.cholesky_ex(matrix[row] + shift * penalty[row]).info > 0
    torch.testing.assert_close(ufm.newton._factor(matrix, problem, gamma), expected, rtol=1e-12, atol=0)
    # the last shift tried is 1e30 times the penalty
    torch.testing.assert_close(ufm.newton._factor(-5e29 * penalty[0][None], problem, gamma[:1]),
                               torch.linalg.cholesky(5e29 * penalty[0][None]), rtol=1e-12, atol=0)
    with pytest.raises(ufm.SolverError, match="^ufm: no positive definite Newton matrix even after a large shift$"):
        ufm.newton._factor(-1e40 * penalty[0][None], problem, gamma[:1])


def focal_with_three_stationary_points():
    """A focal problem in one feature dimension with a local maximum between two local minima.

    W = [[1], [0]], b = (-60, 0), target e_0: the margin is m = h - 60 and the objective
    L(m) + gamma h^2 / 2, L(m) = -(1 - p)^5 log p, p = sigmoid(m). L' dips below -1 near m = -3
    (focal's negative curvature), so f'(m) = L'(m) + gamma (m + 60) has three roots for gamma = 0.02.
    Returns the problem, gamma, the roots in m (by brentq on f' written out here) and f'.
    """
    W = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    b = torch.tensor([-60.0, 0.0], dtype=torch.float64)
    T = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    gamma = 0.02

    def slope(m):  # f'(m): dL/dm = 5 (1-p)^5 p log p - (1-p)^6 (as dp/dm = p (1-p)), plus the penalty's
        p = 1.0 / (1.0 + math.exp(-m))
        return 5 * (1 - p) ** 5 * p * math.log(p) - (1 - p) ** 6 + gamma * (m + 60.0)

    brackets = [(-12.0, -7.0), (-7.0, -4.0), (-3.0, -1.0)]
    roots = [brentq(slope, low, high, xtol=1e-15) for low, high in brackets]
    return ufm.problem._problem(W, b, T, "focal", {"focal_gamma": 5.0}), gamma, roots, slope


def newton_from(problem, gamma, margin):
    """ufm.newton._newton on the one target from h = margin + 60 (coordinates x = h V^T, V = +-1): the margin it ends at."""
    start = (problem.V.T * (margin + 60.0)).reshape(1, -1)
    x, _ = ufm.newton._newton(problem, torch.tensor([gamma], dtype=torch.float64), problem.targets, problem.smoothed, start)
    return float((x @ problem.V)[0, 0]) - 60.0


def test_newton_from_a_point_of_negative_curvature_descends_to_the_minimum_beside_it():
    """Started where the objective's curvature (so the Newton matrix) is negative, on either side of
    the local maximum: shifted steps that only descend end at the minimum on the start's side, at a
    lower objective (written out here). From m = -3, just outside that region, a full step overshoots
    past the maximum into the other basin, to a higher objective: backtracking keeps it on its side."""
    problem, gamma, (left, maximum, right), slope = focal_with_three_stationary_points()

    def objective(m):
        p = 1.0 / (1.0 + math.exp(-m))
        return -(1 - p) ** 5 * math.log(p) + 0.5 * gamma * (m + 60.0) ** 2

    for start in (-6.5, -6.0, -5.0, -4.0, -3.25, -3.0):
        if start != -3.0:
            assert slope(start + 1e-6) - slope(start - 1e-6) < 0  # f'' < 0: the case this test is about
        end = newton_from(problem, gamma, start)
        assert end == pytest.approx(left if start < maximum else right, abs=1e-9), start
        assert objective(end) < objective(start), start


def test_newton_reusing_factors_shifts_a_refreshed_row_of_negative_curvature(monkeypatch):
    """Where factors are reused (REUSE_MIN_CLASSES, lowered here), a row beside settled ones gets a new
    factor of its own: where its Newton matrix is not positive definite, it is shifted as in a full
    refresh. Row 0 starts 5e-4 from the right minimum (settled after a step), row 1 at m = -0.25,
    whose second step starts at negative curvature; both end at the right minimum."""
    problem, gamma, (_, _, right), _ = focal_with_three_stationary_points()
    monkeypatch.setattr(ufm.newton, "REUSE_MIN_CLASSES", 2)
    shifted_alone = []
    factor = ufm.newton._factor

    def recording(matrix, *args):
        shifted_alone.append(len(matrix) == 1 and bool((torch.linalg.cholesky_ex(matrix).info > 0).any()))
        return factor(matrix, *args)
    monkeypatch.setattr(ufm.newton, "_factor", recording)
    starts = torch.tensor([[right + 5e-4 + 60.0], [-0.25 + 60.0]], dtype=torch.float64) * problem.V.T[0]
    x, _ = ufm.newton._newton(problem, torch.full((2,), gamma, dtype=torch.float64), problem.targets.repeat(2, 1),
                       problem.smoothed.repeat(2, 1), starts)
    assert any(shifted_alone)  # the case this test is about
    np.testing.assert_allclose((x @ problem.V).flatten() - 60.0, [right, right], rtol=0, atol=1e-9)


def test_newton_stopped_at_a_saddle_of_the_focal_objective_raises():
    """Docstring: a stationary point whose Newton matrix is not positive definite raises, never
    passes for a minimum. Started exactly at the local maximum, the gradient already vanishes."""
    problem, gamma, (_, maximum, _), _ = focal_with_three_stationary_points()
    with pytest.raises(ufm.SolverError, match="^ufm: the Newton iteration stopped at a saddle point of the objective$"):
        newton_from(problem, gamma, maximum)


@pytest.mark.parametrize("limits, solver, loss_name, message", [
    ({"newton.MAX_ITERATIONS": 1}, ufm.optimal_features, "cross_entropy",
     r"ufm: cross_entropy optimum not converged in 1 Newton steps \(gamma = 0\.3 to 0\.3, 15 targets left\)"),
    # mae: the primal-dual steps hand the rows they do not certify on (MAX_PIECE_STEPS); the
    # one-change-per-step method that takes them over raises when out of steps
    ({"mae.MAX_PIECE_STEPS": 0, "mae.MAX_ACTIVE_SET_STEPS": 1}, ufm.optimal_features, "mae",
     r"ufm: mae optimum not found in 1 active-set steps \(gamma = 0\.3 to 0\.3, \d+ targets left\)"),
    # from h = 0 (the cold starts' best candidates pass Armijo's test at once here)
    ({"newton.MAX_BACKTRACKS": 0}, ufm.newton_features, "cross_entropy",
     r"ufm: the line search found no decrease \(the Newton direction is not a descent direction\)"),
])
def test_a_solver_out_of_steps_raises_instead_of_returning_an_approximation(monkeypatch, limits, solver, loss_name,
                                                                           message):
    W, b = random_classifier(5, 7, seed=43)
    T = mixup_targets(5)  # 15 distinct targets
    for name, value in limits.items():
        monkeypatch.setattr("ufm." + name, value)
    with pytest.raises(ufm.SolverError, match="^" + message + "$"):
        solver(W, 3 * b, T, loss_name, 0.3)


def test_focal_with_a_softmax_saturated_at_the_start():
    """A bias of 40 puts p_0 at 1 in float64 at h = 0: log p_0 = 0 exactly, where focal's per-class
    derivatives must stay finite. Against scipy in the full feature space."""
    W, _ = random_classifier(5, 7, seed=44)
    b = torch.tensor([40.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    T = mixup_targets(5, lambdas=np.array([0.0, 0.3]))
    gamma = 0.05 * spectral_sq(W)
    reference = scipy_optimum(W, b, T, "focal", gamma, focal_gamma=2.0)
    ours = ufm.optimal_features(W, b, T, "focal", gamma, focal_gamma=2.0).numpy()
    assert torch.softmax(b, dim=0)[0] == 1.0  # saturated in float64
    np.testing.assert_allclose(ours, reference, rtol=0, atol=SCIPY_RTOL * np.abs(reference).max())  # h* = 0 for e_0


# ---------------------------------------------------------------- the fit's search and its numbers

def grid_residuals(H, W, b, T, loss_name, gammas, **options):
    """(|PH - s_k H*_k|_F, s_k) at each gamma_k, s_k = max(0, <PH, H*_k>) / |H*_k|^2, by numpy."""
    inside = np.asarray(H) @ (np.eye(W.shape[1]) - null_projector(W))
    out = []
    for gamma in gammas:
        H_star = ufm.optimal_features(W, b, T, loss_name, gamma, **options).numpy()
        scale = max(float(np.sum(inside * H_star)), 0.0) / float(np.sum(H_star ** 2))
        out.append((float(np.linalg.norm(inside - scale * H_star)), scale))
    return out, float(np.linalg.norm(inside))


@pytest.mark.parametrize("gamma_range, exponents", [
    (ufm.GAMMA_RANGE, [4, 2, 0, -2, -4, -6, -8]),  # a grid point every two decades, from the top
    ((1e-2, 10 ** 1.06), [1.06, -0.47, -2]),       # 3.06 decades: 1.53 intervals round to 2
    ((1e-2, 1.0), [0, -2]),                        # 2 decades: the two ends
])
def test_residual_gamma_spread_is_over_the_documented_grid(gamma_range, exponents):
    W, b = random_classifier(4, 10, seed=45, bias=0.2)
    T = mixup_targets(4)
    gamma = 0.1 * spectral_sq(W)
    H, _, _ = planted("cross_entropy", W, b, T, gamma, 2.0, 0.3, seed=46)
    metrics, _ = ufm.fit(H, T, W, b, "cross_entropy", gamma_range=gamma_range)
    residuals, norm = grid_residuals(H, W, b, T, "cross_entropy", [10.0 ** e * spectral_sq(W) for e in exponents])
    spread = (max(r for r, _ in residuals) - min(r for r, _ in residuals)) / norm
    assert spread > 1e-4 and metrics["residual_gamma_spread"] == pytest.approx(spread, rel=1e-6)
    assert metrics["identifiable"] and metrics["gamma"] == pytest.approx(gamma, rel=0.02)


@pytest.mark.parametrize("relative_gamma, gamma_range, best", [
    (0.05, (1e-2, 1e2), 2),  # grid 1e2, 1, 1e-2: the best grid point is the lowest
    (3.0, (1e-3, 10.0), 0),  # grid 10, 0.1, 1e-3: the best grid point is the highest
])
def test_fit_refines_between_the_best_grid_point_and_its_neighbour(relative_gamma, gamma_range, best):
    """The planted gamma lies inside the range, next to an end grid point: the refinement searches
    between that point and its one neighbour, and finds it."""
    W, b = random_classifier(4, 10, seed=48, bias=0.2)
    T = mixup_targets(4)
    gamma = relative_gamma * spectral_sq(W)
    H, _, _ = planted("cross_entropy", W, b, T, gamma, 2.0, 0.5, seed=49)
    grid = [10.0 ** e * spectral_sq(W) for e in np.linspace(math.log10(gamma_range[1]), math.log10(gamma_range[0]), 3)]
    residuals, _ = grid_residuals(H, W, b, T, "cross_entropy", grid)
    assert int(np.argmin([r for r, _ in residuals])) == best  # the case this test is about
    metrics, _ = ufm.fit(H, T, W, b, "cross_entropy", gamma_range=gamma_range)
    assert metrics["identifiable"] and not metrics["gamma_at_bound"]
    assert metrics["gamma"] == pytest.approx(gamma, rel=0.02) and metrics["scale"] == pytest.approx(2.0, rel=0.02)


def test_fit_flags_a_gamma_at_the_top_of_the_search_range():
    W, b = random_classifier(4, 10, seed=21)
    T = mixup_targets(4)
    H, _, _ = planted("cross_entropy", W, b, T, 1.0 * spectral_sq(W), 1.0, 0.0, seed=22)
    metrics, _ = ufm.fit(H, T, W, b, "cross_entropy", gamma_range=(1e-3, 1e-1))
    assert metrics["gamma_at_bound"] and metrics["identifiable"]
    assert metrics["gamma"] == pytest.approx(0.1 * spectral_sq(W), rel=0.05)


def test_fit_with_fewer_distinct_targets_than_classes():
    """One pair type of six classes: 4 distinct targets (lam = 0, 0.3, 0.7, 1), repeated unevenly."""
    W, b = random_classifier(6, 10, seed=50, bias=0.2)
    lam = np.array([0.0, 0.3, 0.3, 0.7, 1.0, 1.0, 1.0])[:, None]
    T = torch.tensor(lam * np.eye(6)[0] + (1 - lam) * np.eye(6)[1])
    gamma = 0.1 * spectral_sq(W)
    H, _, _ = planted("cross_entropy", W, b, T, gamma, 2.0, 0.5, seed=51)
    metrics, _ = ufm.fit(H, T, W, b, "cross_entropy")
    assert metrics["identifiable"] and metrics["gamma"] == pytest.approx(gamma, rel=0.02)
    assert metrics["scale"] == pytest.approx(2.0, rel=0.02) and metrics["residual"] < 1e-3


def test_fit_residuals_of_small_features_and_of_a_group_without_features():
    """Residuals are relative: features of norm 1e-3 give the numpy residuals of their fit; a group
    whose features are all zero has no residual to speak of (NaN), the rest are unaffected."""
    W, b = random_classifier(4, 10, seed=52, bias=0.2)
    T = mixup_targets(4)
    H, _, _ = planted("cross_entropy", W, b, T, 0.05 * spectral_sq(W), 2e-3, 0.3, seed=53)
    H = H + 1e-4 * torch.randn(H.shape, generator=torch.Generator().manual_seed(54), dtype=torch.float64)
    same = torch.tensor([a == c for a, c in triple_pair_types((0, 1, 2)) for _ in LAMBDAS])
    H[same] = 0.0  # same-class points exactly at the origin
    metrics, H_fit = ufm.fit(H, T, W, b, "cross_entropy", same_class=same)
    inside = H.numpy() @ (np.eye(10) - null_projector(W))
    assert float(np.sum(inside ** 2)) < 1e-4
    for key, mask in (("residual", np.ones(len(T), bool)), ("residual_diff_class", ~same.numpy())):
        expected = np.linalg.norm(inside[mask] - H_fit.numpy()[mask]) / np.linalg.norm(inside[mask])
        assert metrics[key] == pytest.approx(expected, rel=1e-9), key
    assert math.isnan(metrics["residual_same_class"])


ZERO_OPTIMUM_REASON = "the optimum is h = 0 for every target at every gamma"


def test_fit_to_an_optimum_that_is_zero_at_every_gamma():
    """mse with b = kappa t for the one target: h* = 0 whatever gamma. There is no shape to fit: NaN
    numbers with the reason (issue 20: this used to read as a residual of 1 with no reason)."""
    W, _ = random_classifier(4, 10, seed=55)
    T = torch.eye(4, dtype=torch.float64)[[0] * 6]
    b = 2.0 * T[0]
    H = torch.randn(6, 10, generator=torch.Generator().manual_seed(56), dtype=torch.float64)
    metrics, H_fit = ufm.fit(H, T, W, b, "mse", mse_scale=2.0)
    assert metrics["nan_reason"].startswith(ZERO_OPTIMUM_REASON)
    assert metrics["gamma"] is None and math.isnan(metrics["residual"]) and torch.isnan(H_fit).all()


def test_mae_with_a_zero_sum_classifier_and_no_bias_has_a_zero_optimum():
    """A simplex ETF's rows sum to zero: with no bias, u = -1 gives W^T u = 0 and mae's optimum is
    h = 0 for every target (issue 20's --loss mae --etf-classifier): NaN with the reason."""
    W = simplex_etf(5, 8, torch.Generator().manual_seed(57))
    T = mixup_targets(5)
    H = torch.randn(len(T), 8, generator=torch.Generator().manual_seed(58), dtype=torch.float64)
    assert ufm.optimal_features(W, None, T, "mae", 0.3).abs().max() < 1e-12
    metrics, _ = ufm.fit(H, T, W, None, "mae")
    assert metrics["nan_reason"].startswith(ZERO_OPTIMUM_REASON)


@pytest.mark.parametrize("case", ["non-finite", "outside the row space"])
def test_fit_without_numbers_returns_every_key_as_nan_or_none(case):
    W, b = random_classifier(4, 10, seed=23)
    T = mixup_targets(4)
    H = torch.zeros(len(T), 10, dtype=torch.float64)  # nothing in the row space of W
    if case == "non-finite":
        H[3, 2] = math.nan
    metrics, H_fit = ufm.fit(H, T, W, b, "cross_entropy")
    reason, gamma_range = {
        "non-finite": ("H is not finite", [math.nan, math.nan]),
        "outside the row space": ("the features have no component in the row space of W",
                                  [1e-8 * spectral_sq(W), 1e4 * spectral_sq(W)]),
    }[case]
    assert set(metrics) == {"gamma", "scale", "identifiable", "gamma_at_bound", "residual", "residual_same_class",
                            "residual_diff_class", "scatter_floor", "shape_residual", "outside_share", "residual_gamma_spread", "curve_gamma",
                            "curve_scale", "gamma_range", "nan_reason"}
    assert metrics["gamma"] is None and metrics["scale"] is None and metrics["nan_reason"] == reason
    assert metrics["identifiable"] is False and metrics["gamma_at_bound"] is False
    for key in ("residual", "residual_same_class", "residual_diff_class", "outside_share", "residual_gamma_spread",
                "curve_gamma", "curve_scale"):
        assert math.isnan(metrics[key]), key
    np.testing.assert_allclose(metrics["gamma_range"], gamma_range, rtol=1e-12)
    assert torch.isnan(H_fit).all()


def test_unfitted_metrics_are_those_of_a_fit_without_numbers_with_the_reason():
    """What the run records after a SolverError: the keys of `fit`, every number NaN, the reason."""
    metrics = ufm.unfitted_metrics("ufm: solver failed")
    W, b = random_classifier(4, 10, seed=23)
    T = mixup_targets(4)
    H = torch.full((len(T), 10), math.nan, dtype=torch.float64)
    reference, _ = ufm.fit(H, T, W, b, "cross_entropy")
    assert set(metrics) == set(reference) and metrics["nan_reason"] == "ufm: solver failed"
    assert metrics["gamma"] is None and metrics["scale"] is None
    assert metrics["identifiable"] is False and metrics["gamma_at_bound"] is False
    for key in set(metrics) - {"gamma", "scale", "identifiable", "gamma_at_bound", "nan_reason", "gamma_range"}:
        assert math.isnan(metrics[key]), key
    assert len(metrics["gamma_range"]) == 2 and all(math.isnan(v) for v in metrics["gamma_range"])


@pytest.mark.parametrize("offset, at_bound", [(1.5, True), (2.5, False)])
def test_fit_flags_a_gamma_within_two_tolerances_of_an_end(offset, at_bound):
    """Planted offset LOG_GAMMA_XATOL times above the lower end (in log gamma), recovered to far
    better than the tolerance here: flagged when within 2 tolerances, not beyond."""
    W, b = random_classifier(4, 10, seed=58, bias=0.2)
    T = mixup_targets(4)
    low = 1e-2
    gamma = low * spectral_sq(W) * math.exp(offset * ufm.search.LOG_GAMMA_XATOL)
    H, _, _ = planted("cross_entropy", W, b, T, gamma, 2.0, 0.3, seed=59)
    metrics, _ = ufm.fit(H, T, W, b, "cross_entropy", gamma_range=(low, 1.0))
    assert metrics["gamma"] == pytest.approx(gamma, rel=0.1 * ufm.search.LOG_GAMMA_XATOL)
    assert metrics["gamma_at_bound"] is at_bound


@pytest.mark.parametrize("loss_name, options", [
    ("cross_entropy", {}), ("focal", {"focal_gamma": 2.0}),
    ("smooth_l1", {}), ("smooth_l1", {"mse_scale": 3.0, "label_smoothing": 0.1}),
])
@pytest.mark.parametrize("shape, seed", [((5, 7), 2), ((7, 4), 8)])
def test_newton_optimum_meets_the_stationarity_rule_over_the_whole_gamma_range(loss_name, options, shape, seed):
    """The module's stopping rule, checked in the full feature space with autograd through the loss:
    |W^T grad_z l + gamma h| <= max(STATIONARITY_RTOL gamma |h|, the gradient's rounding floor
    FLOOR_ULPS eps s_max (|grad_z l|_1 + k |t~|_1)), at gammas from the bottom of the fit's range up."""
    W, b = random_classifier(*shape, seed=seed)
    T = mixup_targets(shape[0], lambdas=np.array([0.0, 0.3, 0.7]))
    kappa = options.get("mse_scale", 1.0) if loss_name == "smooth_l1" else 1.0
    smoothed = (1 - options.get("label_smoothing", 0.0)) * T + options.get("label_smoothing", 0.0) / shape[0]
    s_max = math.sqrt(spectral_sq(W))
    loss = build_loss(loss_name, **options)
    for relative_gamma in (ufm.GAMMA_RANGE[0], 1e-5, 1e-2, 0.3):
        gamma = relative_gamma * s_max ** 2
        H = ufm.optimal_features(W, b, T, loss_name, gamma, **options)
        z = (H @ W.T + b).requires_grad_()
        grad_z, = torch.autograd.grad(loss(z, T) * len(T), z)
        gradient = grad_z @ W + gamma * H
        floor = ufm.newton.FLOOR_ULPS * torch.finfo(torch.float64).eps * s_max * (
            grad_z.abs().sum(dim=1) + kappa * smoothed.abs().sum(dim=1))
        bound = torch.maximum(ufm.newton.STATIONARITY_RTOL * gamma * H.norm(dim=1), floor)
        assert (gradient.norm(dim=1) <= 2 * bound).all(), relative_gamma
