"""ufm: the mixup UFM optimum against closed forms, scipy.optimize in the full feature space and
optimality conditions, the facts of issue 13, and the fit on features planted from a known (s, gamma)."""
import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq, minimize

import ufm
from collapse_metrics import simplex_etf
from losses import build_loss
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
    problem = ufm._problem(W, b, T, loss_name, options)
    z = torch.randn(problem.targets.shape[0], 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 3
    diagonal, left, right = ufm._logit_curvature(problem, z, problem.smoothed)
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


def etf_classifier(C, d, seed):
    return simplex_etf(C, d, torch.Generator().manual_seed(seed)), torch.zeros(C, dtype=torch.float64)


@pytest.mark.parametrize("classifier, relative_gamma", [
    (lambda: random_classifier(6, 9, seed=7), 0.5),
    (lambda: random_classifier(7, 4, seed=8), 0.5),     # C > d: more logits than feature directions
    (lambda: random_classifier(7, 4, seed=8), 1e-3),
    (lambda: etf_classifier(6, 8, seed=9), 0.05),       # rank C - 1, and logits starting on their targets
])
def test_mae_optimum_satisfies_the_subgradient_condition(classifier, relative_gamma):
    """0 in the subdifferential: some u in [-1, 1]^C with u_c = sign(r_c) where r_c != 0 and
    gamma h + W^T u = 0 (sufficient for the unique minimiser of a strongly convex objective)."""
    W, b = classifier()
    T = mixup_targets(W.shape[0], lambdas=np.array([0.0, 0.35]))
    gamma = relative_gamma * spectral_sq(W)
    H = ufm.optimal_features(W, b, T, "mae", gamma, mse_scale=2.0).numpy()
    W, b, T = W.numpy(), b.numpy(), T.numpy()
    on_target_counts = []
    for h, t in zip(H, T):
        r = W @ h + b - 2.0 * t
        on_target = np.abs(r) <= 1e-9 * np.abs(2.0 * t - b).max()
        u = np.sign(r)
        rest = -gamma * h - W[~on_target].T @ u[~on_target]
        u_free, *_ = np.linalg.lstsq(W[on_target].T, rest, rcond=None)
        # (relative to |W|, the size of W^T u for |u| <= 1: h itself may be 0, as for the ETF's one-hot rows)
        assert np.linalg.norm(W[on_target].T @ u_free - rest) <= 1e-9 * np.linalg.norm(W)
        assert np.abs(u_free).max(initial=0.0) <= 1 + 1e-8
        on_target_counts.append(on_target.sum())
    assert 0 < sum(on_target_counts) < T.size  # both kinds of logits occur: the check is not vacuous


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
    """(H, mu, noise): mu + scale H*(gamma) + noise with the noise outside the row space of W."""
    d = W.shape[1]
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    noise = torch.randn(T.shape[0], d, generator=g, dtype=torch.float64) @ torch.tensor(null_projector(W))
    H_star = ufm.optimal_features(W, b, T, loss_name, gamma, **options)
    noise = noise * outside_noise * H_star.norm() / noise.norm()
    return mu + scale * H_star + noise, mu, noise, scale * H_star


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
    H, mu, noise, signal = planted(loss_name, W, b, T, gamma, 3.0, 0.5, seed=14, **options)
    metrics, H_fit = ufm.fit(H, T, W, b, loss_name, mu, **options)
    assert metrics["identifiable"] and not metrics["gamma_at_bound"]
    assert metrics["gamma"] == pytest.approx(gamma, rel=0.02)
    assert metrics["scale"] == pytest.approx(3.0, rel=0.02)
    assert metrics["residual"] < 1e-3
    share = float(noise.square().sum() / (noise.square().sum() + signal.square().sum()))
    assert metrics["outside_share"] == pytest.approx(share, rel=1e-10)
    assert relative(H_fit, signal) < 1e-3
    assert all(isinstance(v, (float, bool, type(None), list, str)) for v in metrics.values())


def test_fit_residuals_are_those_of_the_returned_fit():
    """Residuals by group, recomputed with a numpy projection; H_fit is s H*(gamma) of the public solver."""
    W, b = random_classifier(4, 10, seed=15, bias=0.2)
    T = mixup_targets(4, lambdas=np.linspace(0, 1, 5), repeats=3)
    g = torch.Generator().manual_seed(16)
    H, mu, _, _ = planted("cross_entropy", W, b, T, 0.05 * spectral_sq(W), 2.0, 0.3, seed=16)
    H = H + 0.3 * torch.randn(H.shape, generator=g, dtype=torch.float64)  # also inside the row space
    same = torch.tensor([a == c for a, c in triple_pair_types((0, 1, 2)) for _ in range(5 * 3)])
    metrics, H_fit = ufm.fit(H, T, W, b, "cross_entropy", mu, same_class=same)
    H_star = ufm.optimal_features(W, b, T, "cross_entropy", metrics["gamma"])
    np.testing.assert_allclose(H_fit, metrics["scale"] * H_star, rtol=1e-9, atol=1e-12)
    inside = (H - mu).numpy() @ (np.eye(10) - null_projector(W))
    for key, mask in (("residual", np.ones(len(T), bool)), ("residual_same_class", same.numpy()),
                      ("residual_diff_class", ~same.numpy())):
        expected = np.linalg.norm(inside[mask] - H_fit.numpy()[mask]) / np.linalg.norm(inside[mask])
        assert metrics[key] == pytest.approx(expected, rel=1e-9)
    # by default, one-hot targets count as same-class: different-class pairs at lam 0 and 1 too
    default, default_fit = ufm.fit(H, T, W, b, "cross_entropy", mu)
    one_hot = (T.numpy() != 0).sum(axis=1) == 1
    expected = np.linalg.norm(inside[one_hot] - default_fit.numpy()[one_hot]) / np.linalg.norm(inside[one_hot])
    assert default["residual_same_class"] == pytest.approx(expected, rel=1e-9)


def test_fit_least_squares_scale_is_optimal_for_its_gamma():
    W, b = random_classifier(4, 10, seed=17)
    T = mixup_targets(4)
    H, mu, _, _ = planted("cross_entropy", W, b, T, 0.05 * spectral_sq(W), 2.0, 0.0, seed=18)
    H = H + 0.5 * torch.randn(H.shape, generator=torch.Generator().manual_seed(19), dtype=torch.float64)
    metrics, _ = ufm.fit(H, T, W, b, "cross_entropy", mu)
    H_star = ufm.optimal_features(W, b, T, "cross_entropy", metrics["gamma"]).numpy()
    inside = (H - mu).numpy() @ (np.eye(10) - null_projector(W))
    assert metrics["scale"] == pytest.approx(np.sum(inside * H_star) / np.sum(H_star ** 2), rel=1e-9)


def test_fit_is_not_identifiable_for_mse_with_a_simplex_etf_and_no_bias():
    """H* = W^T t~ / (C/(C-1) + gamma): every gamma gives the same shape."""
    C = 4
    W = simplex_etf(C, 7, torch.Generator().manual_seed(20))
    T = mixup_targets(C)
    mu = torch.ones(7, dtype=torch.float64)
    H = mu + 5.0 * (T - 1.0 / C) @ W
    metrics, H_fit = ufm.fit(H, T, W, None, "mse", mu)
    assert metrics["identifiable"] is False and metrics["gamma"] is None and metrics["scale"] is None
    assert metrics["residual"] < 1e-12 and metrics["residual_gamma_spread"] < 1e-12
    np.testing.assert_allclose(H_fit, H - mu, rtol=0, atol=1e-12)
    curve = ufm.theory_curve(W, None, (0, 1), LAMBDAS, "mse", metrics["curve_gamma"], metrics["curve_scale"])
    np.testing.assert_allclose(curve, 5.0 * (mixup_targets(C)[18:24] - 1.0 / C) @ W, rtol=0, atol=1e-12)


def test_fit_flags_a_gamma_at_the_end_of_the_search_range():
    W, b = random_classifier(4, 10, seed=21)
    T = mixup_targets(4)
    H, mu, _, _ = planted("cross_entropy", W, b, T, 1e-3 * spectral_sq(W), 1.0, 0.0, seed=22)
    metrics, _ = ufm.fit(H, T, W, b, "cross_entropy", mu, gamma_range=(1e-1, 1e3))
    assert metrics["gamma_at_bound"] and metrics["identifiable"]
    assert metrics["gamma"] == pytest.approx(0.1 * spectral_sq(W), rel=0.05)
    assert metrics["gamma_range"] == pytest.approx([0.1 * spectral_sq(W), 1e3 * spectral_sq(W)])


def test_fit_reports_non_finite_input_as_nan_with_a_reason():
    W, b = random_classifier(4, 10, seed=23)
    T = mixup_targets(4)
    H = torch.zeros(T.shape[0], 10, dtype=torch.float64)
    H[3, 2] = math.nan
    metrics, H_fit = ufm.fit(H, T, W, b, "cross_entropy", torch.zeros(10))
    assert metrics["gamma"] is None and math.isnan(metrics["residual"]) and "H" in metrics["nan_reason"]
    assert torch.isnan(H_fit).all()


def test_fit_works_under_inference_mode_and_with_float32_numpy_input():
    """The feature capture runs under torch.inference_mode and holds float32 features."""
    W, b = random_classifier(4, 10, seed=24)
    T = mixup_targets(4)
    H, mu, _, _ = planted("cross_entropy", W, b, T, 0.05 * spectral_sq(W), 2.0, 0.2, seed=25)
    expected, _ = ufm.fit(H.float().numpy(), T.float(), W.float(), b.float(), "cross_entropy", mu.float())
    with torch.inference_mode():
        got, H_fit = ufm.fit(H.float(), T.float(), W.float(), b.float(), "cross_entropy", mu.float())
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

@pytest.mark.parametrize("call, message", [
    (lambda W, T: ufm.optimal_features(W, None, T, "hinge", 1.0), "unknown loss"),
    (lambda W, T: ufm.optimal_features(W, None, T, "focal", 1.0, focal_gama=2.0), "unknown loss option"),
    (lambda W, T: ufm.optimal_features(W, None, T, "mse", 0.0), "gamma must be"),
    (lambda W, T: ufm.optimal_features(W, None, T[:, :3], "mse", 1.0), "T \\(n, C\\)"),
    (lambda W, T: ufm.optimal_features(0 * W, None, T, "mse", 1.0), "W is zero"),
    (lambda W, T: ufm.newton_features(W, None, T, "mae", 1.0), "not differentiable"),
    (lambda W, T: ufm.fit(torch.zeros(len(T), 6), T, W, None, "mse", torch.zeros(7)), "H must be"),
    (lambda W, T: ufm.fit(torch.zeros(len(T), 7), T, W, None, "mse", torch.zeros(7), same_class=[True]), "same_class"),
    (lambda W, T: ufm.fit(torch.zeros(len(T), 7), T, W, None, "mse", torch.zeros(7), gamma_range=(1, 1)),
     "gamma_range"),
])
def test_bad_input_is_a_clear_value_error(call, message):
    W, _ = random_classifier(4, 7, seed=27)
    with pytest.raises(ValueError, match=message):
        call(W, mixup_targets(4))
