"""ufm's fast paths (issue 13, "Speed"): the batch of gammas against one gamma at a time, tangents and
the residual's slope against finite differences and closed forms, the per-row losses against
losses.build_loss, focal's curvature against autograd, mae's primal-dual steps against the active-set
method alone, the fitted gamma against a direct minimisation of the residual, and the helpers against
direct computations."""
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

import ufm
from losses import LOSSES, build_loss
import test_ufm
from test_ufm import relative, spectral_sq

ALL_LOSSES = ["cross_entropy", "focal", "smooth_l1", "mse", "mae"]
NEWTON_CASES = [("cross_entropy", {}), ("cross_entropy", {"label_smoothing": 0.1}), ("focal", {"focal_gamma": 2.0}),
                ("focal", {"focal_gamma": 0.5, "label_smoothing": 0.05}), ("smooth_l1", {"mse_scale": 2.0})]
# solutions meet |grad| <= 1e-10 gamma |x|: two of them differ by at most twice that, relative
SOLVE_RTOL = 2 * ufm.newton.STATIONARITY_RTOL


def random_classifier(C, d, seed, bias=0.3):  # test_ufm's, with smaller biases
    return test_ufm.random_classifier(C, d, seed, bias)


def mixup_targets(C, lambdas=np.linspace(0.0, 1.0, 5), repeats=1):  # test_ufm's, on a coarser lambda grid
    return test_ufm.mixup_targets(C, lambdas=lambdas, repeats=repeats)


def row_space_projector(W):
    W = np.asarray(W)
    return np.linalg.pinv(W) @ W


def float64(values):
    return torch.tensor(values, dtype=torch.float64)


def gammas(problem, values):
    return float64(values) * float(problem.S[0]) ** 2


# ---------------------------------------------------------------- the batch of gammas

@pytest.mark.parametrize("loss_name", ALL_LOSSES)
@pytest.mark.parametrize("shape", [(5, 7), (7, 4)])  # C > d: W has a null space in logit space
def test_a_batch_of_gammas_solves_each_as_alone(loss_name, shape):
    W, b = random_classifier(*shape, seed=1)
    T = mixup_targets(shape[0])
    problem = ufm.problem._problem(W, b, T, loss_name, {})
    values = gammas(problem, [1e-4, 3e-2, 1.0, 30.0])
    batch = ufm.optimum._solve(problem, values).x
    for k in range(len(values)):
        alone = ufm.optimal_features(W, b, T, loss_name, float(values[k]))
        np.testing.assert_allclose(problem.features(batch[k]), alone, rtol=0,
                                   atol=SOLVE_RTOL * float(alone.abs().max()))


@pytest.mark.parametrize("loss_name", ["cross_entropy", "mae"])
def test_the_grid_one_gamma_after_another_gives_the_same_fit(monkeypatch, loss_name):
    """Large problems solve the grid sequentially from warm starts: the same optima, so the same fit."""
    W, b = random_classifier(5, 12, seed=2)
    T = mixup_targets(5, repeats=2)
    H = planted_features(loss_name, W, b, T, 0.02, seed=3)
    batched, _ = ufm.fit(H, T, W, b, loss_name)
    monkeypatch.setattr(ufm.search, "BATCH_ELEMENTS", 0)
    sequential, _ = ufm.fit(H, T, W, b, loss_name)
    assert sequential["gamma"] == pytest.approx(batched["gamma"], rel=1e-6)
    for key in ("residual", "residual_gamma_spread", "scale"):
        assert sequential[key] == pytest.approx(batched[key], rel=1e-8), key


@pytest.mark.parametrize("loss_name, options", [("cross_entropy", {}), ("focal", {"focal_gamma": 2.0})])
def test_reused_factorisations_reach_the_stationary_point(monkeypatch, loss_name, options):
    """C >= REUSE_MIN_CLASSES: rows in Newton's quadratic phase reuse their last factor. The optimum
    is the one without reuse, and stationary in the full feature space (autograd through losses)."""
    C, d = ufm.newton.REUSE_MIN_CLASSES + 8, ufm.newton.REUSE_MIN_CLASSES + 16
    W, b = random_classifier(C, d, seed=19)
    T = mixup_targets(C, lambdas=np.array([0.0, 0.3, 0.8]))
    loss = build_loss(loss_name, **options)
    for relative_gamma in (1e-5, 0.03):
        gamma = relative_gamma * spectral_sq(W)
        reused = ufm.optimal_features(W, b, T, loss_name, gamma, **options)
        leaf = reused.clone().requires_grad_()
        gradient, = torch.autograd.grad(loss(leaf @ W.T + b, T) * len(T) + 0.5 * gamma * leaf.square().sum(), leaf)
        assert float(gradient.norm(dim=1).max()) <= 1e-8 * gamma * float(reused.norm(dim=1).max())
        with monkeypatch.context() as patch:
            patch.setattr(ufm.newton, "REUSE_MIN_CLASSES", C + 1)
            fresh = ufm.optimal_features(W, b, T, loss_name, gamma, **options)
        np.testing.assert_allclose(reused, fresh, rtol=0, atol=SOLVE_RTOL * float(fresh.abs().max()))


# ---------------------------------------------------------------- tangents and the residual's slope

@pytest.mark.parametrize("loss_name, options", NEWTON_CASES + [("mse", {"mse_scale": 1.5})])
def test_tangent_is_the_derivative_of_the_optimum_in_log_gamma(loss_name, options):
    W, b = random_classifier(5, 7, seed=4)
    problem = ufm.problem._problem(W, b, mixup_targets(5), loss_name, options)
    gamma, step = float(gammas(problem, [0.05])[0]), 1e-4
    tangent = ufm.optimum._solve(problem, float64([gamma]), tangents=True).tangent[0]
    plus = ufm.optimum._solve(problem, float64([gamma * math.exp(step)])).x[0]
    minus = ufm.optimum._solve(problem, float64([gamma * math.exp(-step)])).x[0]
    central = (plus - minus) / (2 * step)  # error ~ step^2 |x'''| and 1e-10 |x| / step
    assert relative(tangent, central) < 1e-5


def test_mae_tangent_is_that_of_the_clipped_target():
    """W = sigma Q, orthonormal rows, b = 0: the logits are clip(a, -c, c) with c = sigma^2 / gamma, so
    d z / d log gamma = -c sign(a) where clipped, 0 elsewhere, and h = Q^T z / sigma."""
    C, d, sigma, kappa = 5, 8, 2.0, 1.5
    Q = torch.linalg.qr(torch.randn(d, C, generator=torch.Generator().manual_seed(5), dtype=torch.float64))[0].T
    T = mixup_targets(C)
    gamma = sigma ** 2 / 0.8
    problem = ufm.problem._problem(sigma * Q, None, T, "mae", {"mse_scale": kappa})
    solved = ufm.optimum._solve(problem, float64([gamma]), tangents=True)
    a = kappa * problem.targets.numpy()
    clip = sigma ** 2 / gamma
    expected = np.where(np.abs(a) > clip, -clip * np.sign(a), 0.0) @ Q.numpy() / sigma
    np.testing.assert_allclose(solved.tangent[0] @ problem.V, expected, rtol=0, atol=1e-10)
    assert (np.abs(a) > clip).any() and (np.abs(a) < clip).any()


def planted_features(loss_name, W, b, T, relative_gamma, seed, **options):
    """2 H*(gamma) plus noise inside the row space and outside it (uncentred, as ufm.fit models)."""
    g = torch.Generator().manual_seed(seed)
    d = W.shape[1]
    signal = 2.0 * ufm.optimal_features(W, b, T, loss_name, relative_gamma * spectral_sq(W), **options)
    noise = torch.randn(T.shape[0], d, generator=g, dtype=torch.float64)
    return signal + 0.3 * signal.norm() * noise / noise.norm()


def direct_residual(W, b, T, H, loss_name, gamma, **options):
    """|PH - s H*|^2 with s the least-squares scale >= 0, by numpy, row by row."""
    Y = np.asarray(H) @ row_space_projector(W)
    H_star = ufm.optimal_features(W, b, T, loss_name, gamma, **options).numpy()
    scale = max(float(np.sum(Y * H_star)), 0.0) / float(np.sum(H_star ** 2))
    return scale, float(np.sum((Y - scale * H_star) ** 2))


@pytest.mark.parametrize("loss_name", ["cross_entropy", "smooth_l1", "mse"])
def test_points_hold_the_scale_residual_and_slope_of_the_direct_computation(loss_name):
    W, b = random_classifier(5, 9, seed=6)
    T = mixup_targets(5, repeats=3)
    H = planted_features(loss_name, W, b, T, 0.05, seed=7)
    problem = ufm.problem._problem(W, b, T, loss_name, {})
    data = ufm.search._data(problem, H.clone())
    gamma, step = 0.1 * spectral_sq(W), 1e-4
    point, = ufm.search._points(data, ufm.optimum._solve(problem, float64([gamma]), tangents=True))
    scale, residual = direct_residual(W, b, T, H, loss_name, gamma)
    assert point.scale == pytest.approx(scale, rel=1e-10)
    assert point.residual == pytest.approx(residual, rel=1e-10)
    plus = direct_residual(W, b, T, H, loss_name, gamma * math.exp(step))[1]
    minus = direct_residual(W, b, T, H, loss_name, gamma * math.exp(-step))[1]
    assert point.slope == pytest.approx((plus - minus) / (2 * step), rel=1e-5)


# ---------------------------------------------------------------- the search

@pytest.mark.parametrize("loss_name, options, relative_gamma", [
    ("cross_entropy", {}, 0.05), ("cross_entropy", {"label_smoothing": 0.1}, 3e-4),
    ("focal", {"focal_gamma": 2.0}, 0.05), ("smooth_l1", {}, 0.2), ("mse", {"mse_scale": 2.0}, 0.5),
    ("mae", {"mse_scale": 2.0}, 0.5),  # mae: a gamma where its shape varies, so the refinement runs
    ("mae", {"mse_scale": 2.0}, 0.2)])  # a minimum narrower than two decades (a sparser grid fits 0.01)
def test_fitted_gamma_minimises_the_residual_to_the_documented_tolerance(loss_name, options, relative_gamma):
    """The fit against scipy's bounded minimisation of the directly computed residual, to 1e-7 in log gamma,
    and no worse than the planted gamma (no better minimum missed between grid points)."""
    W, b = random_classifier(5, 12, seed=8)
    T = mixup_targets(5, repeats=2)
    H = planted_features(loss_name, W, b, T, relative_gamma, seed=9, **options)
    metrics, _ = ufm.fit(H, T, W, b, loss_name, **options)
    assert metrics["identifiable"] and not metrics["gamma_at_bound"]
    fitted = math.log(metrics["gamma"])
    reference = minimize_scalar(lambda lg: direct_residual(W, b, T, H, loss_name, math.exp(lg), **options)[1],
                                bounds=(fitted - 1.0, fitted + 1.0), method="bounded", options={"xatol": 1e-7}).x
    assert abs(fitted - reference) <= ufm.search.LOG_GAMMA_XATOL
    best = direct_residual(W, b, T, H, loss_name, math.exp(reference), **options)[1]
    Y = H.numpy() @ row_space_projector(W)
    # mae's residual has kinks in log gamma (pieces change): there gamma's error enters to first order
    assert metrics["residual"] ** 2 * np.sum(Y ** 2) == pytest.approx(best, rel=1e-5 if loss_name == "mae" else 1e-6)
    at_planted = direct_residual(W, b, T, H, loss_name, relative_gamma * spectral_sq(W), **options)[1]
    assert best <= at_planted * (1 + 1e-6)


def test_mae_refinement_reaches_the_minimum_of_its_kinked_residual():
    """A case where cubic steps through the residuals and slopes (the smooth losses' refinement) stop at
    a residual of 0.212 and 0.48 away in log gamma, on a kink: mae's bounded Brent on the residual's
    values reaches scipy's minimum of the directly computed residual, 0.197."""
    W, b = test_ufm.random_classifier(5, 12, seed=5)
    T = test_ufm.mixup_targets(5, repeats=2)
    H = planted_features("mae", W, b, T, 0.05, seed=105, mse_scale=2.0)
    metrics, _ = ufm.fit(H, T, W, b, "mae", mse_scale=2.0)
    fitted = math.log(metrics["gamma"])
    reference = minimize_scalar(lambda lg: direct_residual(W, b, T, H, "mae", math.exp(lg), mse_scale=2.0)[1],
                                bounds=(fitted - 1.0, fitted + 1.0), method="bounded", options={"xatol": 1e-7}).x
    assert abs(fitted - reference) <= ufm.search.KINKED_XATOL
    assert metrics["residual"] == pytest.approx(0.1974, abs=1e-4)


@pytest.mark.parametrize("planted", [0.06, 4.5])  # nearest grid point: the range's first, the range's last
def test_mae_refinement_at_an_end_of_the_range_searches_towards_its_one_neighbour(planted):
    """A narrow gamma_range (0.05 to 5 s_max^2: grid points at 0.05, 0.16, 0.5, 1.6 and 5): an exact
    optimum planted next to an end is found between that end and its neighbour."""
    W, b = test_ufm.random_classifier(5, 12, seed=5)
    T = test_ufm.mixup_targets(5, repeats=2)
    gamma = planted * spectral_sq(W)
    H = 2.5 * ufm.optimal_features(W, b, T, "mae", gamma, mse_scale=2.0)
    metrics, _ = ufm.fit(H, T, W, b, "mae", gamma_range=(0.05, 5.0), mse_scale=2.0)
    assert metrics["residual"] < 1e-6 and metrics["gamma"] == pytest.approx(gamma, rel=1e-4)


def test_cubic_step_lands_on_the_minimum_of_a_cubic():
    """Residuals and slopes of f(t) = (t - 0.3)^2 (1 + t) at 0 and at width 2: its minimum 0.3 is the step."""
    def point(t):
        return ufm.search._Point(None, None, 1.0, (t - 0.3) ** 2 * (1 + t), 2 * (t - 0.3) * (1 + t) + (t - 0.3) ** 2)
    assert ufm.search._cubic_step(point(0.0), point(2.0), 2.0) == pytest.approx(0.3, rel=1e-12)
    # from the other side, the minimum is farther than halfway to the end: the step stops halfway
    assert ufm.search._cubic_step(point(2.0), point(0.0), -2.0) == pytest.approx(-1.0, rel=1e-12)


@pytest.mark.parametrize("f, slope, expected", [
    # 0.1 (t - 0.2)^2 (3 - t): the cubic's minimum 0.2 lies inside (0, 1) (its f' terms are below 1)
    (lambda t: 0.1 * (t - 0.2) ** 2 * (3 - t), lambda t: 0.1 * (2 * (t - 0.2) * (3 - t) - (t - 0.2) ** 2), 0.2),
    # -(t - 1/4)^3: f' = -3 (t - 1/4)^2 vanishes only at 1/4 (a double root; exact in binary)
    (lambda t: -(t - 0.25) ** 3, lambda t: -3 * (t - 0.25) ** 2, 0.25),
    # linear, 1 - t: neither the cubic nor the parabola (curvature 0) has a minimum: halfway
    (lambda t: 1 - t, lambda t: -1.0, 0.5),
    # 1 - t / 10 - t^3 falls ever faster (f' < 0, no real root): halfway, the parabola's curvature is -1
    (lambda t: 1 - 0.1 * t - t ** 3, lambda t: -0.1 - 3 * t ** 2, 0.5),
    # -t + 0.45 t^2: the minimum 10/9 lies beyond the end: halfway
    (lambda t: -t + 0.45 * t ** 2, lambda t: -1 + 0.9 * t, 0.5),
    (lambda t: -t + 0.1 * t ** 2, lambda t: -1 + 0.2 * t, 0.5),  # 5, and the parabola's too: halfway
])
@pytest.mark.parametrize("width", [1.0, -0.5])
def test_cubic_step_to_the_minimum_inside_or_halfway(f, slope, expected, width):
    """The step (in t = offset / width, the residual falling from t = 0) to the minimum of the cubic
    through f and f' at 0 and 1, at most halfway: worked out by hand for each f."""
    def point(t):  # slopes in log gamma: df/dt / width
        return ufm.search._Point(None, None, 1.0, f(t), slope(t) / width)
    assert ufm.search._cubic_step(point(0.0), point(1.0), width) == pytest.approx(expected * width, rel=1e-12)


class CurveSolutions(ufm.search._Solutions):
    """ufm's _Solutions over a residual curve given as a function of log gamma (value, slope): the
    refinement's logic alone, against minima known in closed form."""

    def __init__(self, curve, inside=1.0):
        self.curve, self.data, self.points = curve, type("Data", (), {"inside": inside})(), {}

    def add(self, values):
        for value in values:
            residual, slope = self.curve(value)
            self.points[float(value)] = ufm.search._Point(None, None, 1.0, residual, slope)

    def solve_between(self, values, near, far, tangents=True):
        self.add(values)


def refined(curve, grid, inside=1.0):
    solutions = CurveSolutions(curve, inside)
    solutions.add(grid)
    return ufm.search._refine(solutions, grid)


def test_refinement_finds_the_minimum_whatever_the_grid_and_the_size_of_the_residual():
    """Parabolas with their minimum between the grid points -1 and 1 (symmetric about 0): at 0.9; and
    at 2/3 scaled to 5e-13 with |P H|^2 = 20, so that the first bracket's slope times width,
    6.7e-13, is above the flatness threshold 64 eps |P H|^2 = 2.8e-13 (the first level finds 2/3)."""
    for minimum, scale, inside in ((0.9, 1.0, 1.0), (2 / 3, 5e-13, 20.0)):
        best = refined(lambda t: (scale * (t - minimum) ** 2, 2 * scale * (t - minimum)), [-1.0, 1.0], inside)
        assert best == pytest.approx(minimum, abs=ufm.search.LOG_GAMMA_XATOL)


def test_refinement_breaks_ties_towards_the_largest_gamma():
    """Docstring: ties go to the largest gamma. A flat residual: the largest grid point. A residual
    flat on [0, 1.5], (t - 1.5)^2 above and t^2 below, on the grid -1, 2: the first level solves 1.5,
    1 and 0.5, all at 0, and the largest is kept, where the residual is flat: the answer."""
    assert refined(lambda t: (1.0, 0.0), [-2.0, 0.0, 2.0]) == 2.0

    def flat_middle(t):
        return (t - 1.5) ** 2 if t > 1.5 else t ** 2 if t < 0 else 0.0, 2 * (t - 1.5) if t > 1.5 else 2 * t if t < 0 else 0.0
    assert refined(flat_middle, [-1.0, 2.0]) == 1.5


def shape_solutions(x_by_gamma, counts):
    solutions = CurveSolutions(None)
    solutions.data.counts = torch.tensor(counts, dtype=torch.float64)
    solutions.points = {float(k): ufm.search._Point(torch.tensor(x, dtype=torch.float64), None, 1.0, 0.0, 0.0)
                        for k, x in enumerate(x_by_gamma)}
    return solutions, [float(k) for k in range(len(x_by_gamma))]


def shape_change(x_by_gamma, counts):
    """Largest |H*_k / |H*_k| - H*_0 / |H*_0|| over the n rows (each target repeated count times), by numpy."""
    rows = [np.repeat(np.asarray(x, dtype=float), counts, axis=0) for x in x_by_gamma]
    shapes = [r / np.linalg.norm(r) for r in rows]
    return max(np.linalg.norm(s - shapes[0]) for s in shapes[1:])


@pytest.mark.parametrize("x_by_gamma, counts, varies", [
    # rows weigh by their count: a change of 1.5e-6 in the target of count 1 moves the 5 rows' shape by
    # 0.67e-6, one of 2e-6 in the target of count 4 by 1.8e-6
    ([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.5e-6], [0.0, 1.0]]], [1, 4], False),
    ([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [2e-6, 1.0]]], [1, 4], True),
    # two gammas each 0.85e-6 from the first: neither is above SHAPE_RTOL, their root sum of squares would be
    ([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.2e-6], [0.0, 1.0]], [[1.0, 0.0], [1.2e-6, 1.0]]], [1, 1], False),
])
def test_shape_varies_over_the_rows_between_any_grid_gamma_and_the_first(x_by_gamma, counts, varies):
    solutions, grid = shape_solutions(x_by_gamma, counts)
    assert bool(shape_change(x_by_gamma, counts) > ufm.search.SHAPE_RTOL) is varies  # the formula, by numpy
    assert ufm.search._shape_varies(solutions, grid) is varies


def test_refinement_stops_where_the_residual_is_flat(monkeypatch):
    """mae below its interpolation gamma: every logit on its target, H* = W^+ (kappa t - b) at every such
    gamma; features planted there give a residual flat to rounding, and no refinement solve is needed."""
    W, b = random_classifier(5, 8, seed=10)
    T = mixup_targets(5)
    H = 3.0 * ufm.optimal_features(W, b, T, "mae", 1e-8 * spectral_sq(W))
    solves = []
    original = ufm.search._Solutions.solve_between
    monkeypatch.setattr(ufm.search._Solutions, "solve_between",
                        lambda self, *args: solves.append(args) or original(self, *args))
    metrics, _ = ufm.fit(H, T, W, b, "mae")
    assert metrics["residual"] < 1e-10 and solves == []


def test_refinement_stops_where_the_residual_is_flat_above_its_floor(monkeypatch):
    """mae above the gamma at which no logit sits on its target: H* = -W^T sign(b - kappa t) / gamma,
    one shape up to the top of the range. With within-target scatter added the residual is flat at
    the scatter's floor, not at zero, and still no refinement solve is needed."""
    W, b = random_classifier(5, 8, seed=10)
    T = mixup_targets(5, repeats=2)
    H = 3.0 * ufm.optimal_features(W, b, T, "mae", 1e3 * spectral_sq(W))
    noise = torch.randn(H.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    noise[1::2] = -noise[0::2]  # repeats=2: each target's two rows are adjacent, their noise sums to zero
    noise = noise @ torch.linalg.pinv(W) @ W  # inside the row space, where the floor counts it
    solves = []
    original = ufm.search._Solutions.solve_between
    monkeypatch.setattr(ufm.search._Solutions, "solve_between",
                        lambda self, *args: solves.append(args) or original(self, *args))
    metrics, _ = ufm.fit(H + 0.3 * noise * H.norm() / noise.norm(), T, W, b, "mae")
    assert metrics["scatter_floor"] > 0.2 and metrics["shape_residual"] < 1e-10 and solves == []


# ---------------------------------------------------------------- the pieces of the Newton solver

@pytest.mark.parametrize("loss_name, options",
                         NEWTON_CASES + [("mse", {"mse_scale": 2.0}), ("mae", {"mse_scale": 0.5})])
def test_row_losses_are_build_loss_of_each_row(loss_name, options):
    W, b = random_classifier(5, 7, seed=11)
    problem = ufm.problem._problem(W, b, mixup_targets(5), loss_name, options)
    z = 3 * torch.randn(problem.targets.shape[0], 5, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    loss = build_loss(loss_name, **options)
    expected = torch.stack([loss(z[i:i + 1], problem.targets[i:i + 1]) for i in range(len(z))])
    torch.testing.assert_close(ufm.objective._row_losses(problem, z, problem.smoothed), expected, rtol=1e-12, atol=1e-14)


def test_every_loss_has_a_written_row_loss_and_a_new_one_is_refused_by_name():
    """The line search's per-row losses are written out per loss: each of losses.LOSSES has its own
    form (not another loss's: the values differ), and a loss added to losses.py without one is named."""
    W, b = random_classifier(4, 6, seed=14)
    problem = ufm.problem._problem(W, b, mixup_targets(4), "mse", {})
    z = torch.randn(problem.targets.shape[0], 4, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    values = set()
    for name in LOSSES:
        problem.loss_name = name
        values.add(float(ufm.objective._row_losses(problem, z, problem.smoothed).sum()))
    assert len(values) == len(LOSSES)
    problem.loss_name = "hinge"
    with pytest.raises(ValueError, match=r"^ufm: no per-row form of the loss 'hinge' in ufm/objective.py \(losses.py has one\)$"):
        ufm.objective._row_losses(problem, z, problem.smoothed)


def test_row_losses_that_disagree_with_build_loss_stop_the_solver(monkeypatch):
    W, b = random_classifier(4, 6, seed=13)
    original = ufm.objective._row_losses
    monkeypatch.setattr(ufm.newton, "_row_losses", lambda problem, z, t: original(problem, z, t) + 1e-6)
    with pytest.raises(ufm.SolverError, match="disagrees with losses.build_loss"):
        ufm.optimal_features(W, b, mixup_targets(4), "cross_entropy", 0.1)


def focal_derivatives_through_losses(focal_gamma, q):
    """phi'(q), phi''(q) of focal's per-class term by autograd through losses.focal: on the two logits
    (q, log(1 - e^q)), whose log-softmax is themselves, the loss of target e_0 is phi(q)."""
    loss = build_loss("focal", focal_gamma=focal_gamma)
    leaf = q.clone().requires_grad_()
    pair = torch.stack([leaf, torch.log(-torch.expm1(leaf))], dim=1)
    target = torch.zeros_like(pair)
    target[:, 0] = 1.0
    first, = torch.autograd.grad(loss(pair, target) * len(q), leaf, create_graph=True)
    second, = torch.autograd.grad(first.sum(), leaf)
    return first.detach(), second


@pytest.mark.parametrize("focal_gamma", [0.0, 0.5, 1.0, 2.0, 3.7])  # 0: cross-entropy's phi = -q
def test_focal_class_term_derivatives_match_autograd_through_losses(focal_gamma):
    q = -torch.logspace(-6, 1.4, 300, dtype=torch.float64)  # p from 1 - 1e-6 to 1e-11
    expected_first, expected_second = focal_derivatives_through_losses(focal_gamma, q)

    class Problem:
        pass
    problem = Problem()
    problem.focal_gamma = focal_gamma
    first, second = ufm.objective._class_term_derivatives(problem, q)
    # the reference loses digits to cancellation in log(1 - e^q) near q = 0: absolute, on the O(1) scale
    torch.testing.assert_close(first, expected_first, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(second, expected_second, rtol=1e-6, atol=1e-9 * max(1.0, float(expected_second.abs().max())))


def test_lowest_start_is_the_candidate_of_least_objective_per_row():
    W, b = random_classifier(5, 7, seed=14)
    problem = ufm.problem._problem(W, b, mixup_targets(5), "cross_entropy", {})
    m, r = problem.targets.shape[0], problem.S.shape[0]
    gamma = torch.full((m,), 0.3, dtype=torch.float64)
    g = torch.Generator().manual_seed(15)
    candidates = [torch.randn(m, r, generator=g, dtype=torch.float64) for _ in range(3)]
    chosen = ufm.newton._lowest(problem, gamma, problem.smoothed, candidates)
    loss = build_loss("cross_entropy")
    for i in range(m):
        values = [float(loss(problem.logits(c[i:i + 1]), problem.targets[i:i + 1])) + 0.15 * float(c[i].square().sum())
                  for c in candidates]
        assert torch.equal(chosen[i], candidates[int(np.argmin(values))][i])


# ---------------------------------------------------------------- mae's primal-dual steps

@pytest.mark.parametrize("shape, relative_gamma", [((6, 9), 0.5), ((6, 9), 0.05), ((7, 4), 0.5), ((7, 4), 1e-3)])
def test_mae_primal_dual_steps_give_the_active_set_optimum(monkeypatch, shape, relative_gamma):
    W, b = random_classifier(*shape, seed=16)
    T = mixup_targets(shape[0], lambdas=np.linspace(0.0, 1.0, 7))
    gamma = relative_gamma * spectral_sq(W)
    both = ufm.optimal_features(W, b, T, "mae", gamma, mse_scale=2.0)
    monkeypatch.setattr(ufm.mae, "MAX_PIECE_STEPS", 0)  # the one-change-per-step method alone
    alone = ufm.optimal_features(W, b, T, "mae", gamma, mse_scale=2.0)
    np.testing.assert_allclose(both, alone, rtol=0, atol=1e-10 * float(alone.abs().max()))


def test_mae_primal_dual_steps_certify_rows_and_hand_the_rest_on(monkeypatch):
    """From h = 0 at a gamma where many logits change piece: the steps certify rows by themselves (equal
    to the optimum), and with a single step allowed the rest still reaches the same optimum."""
    W, b = random_classifier(6, 9, seed=17)
    T = mixup_targets(6, lambdas=np.linspace(0.0, 1.0, 7))
    problem = ufm.problem._problem(W, b, T, "mae", {"mse_scale": 2.0})
    gamma = torch.full((problem.targets.shape[0],), 0.05 * spectral_sq(W), dtype=torch.float64)
    A = problem.US
    beta = problem.b - problem.kappa * problem.smoothed
    scale = beta.abs().amax(dim=1, keepdim=True).clamp(min=1.0)
    start = torch.zeros(len(gamma), A.shape[1], dtype=torch.float64)
    x, uncertified = ufm.mae._mae_pieces(A, A @ A.T, beta, gamma, scale, start)
    optimum = ufm.optimum._solve(problem, gamma[:1]).x[0]
    assert int((~uncertified).sum()) > 0
    torch.testing.assert_close(x[~uncertified], optimum[~uncertified], rtol=0, atol=1e-10)
    monkeypatch.setattr(ufm.mae, "MAX_PIECE_STEPS", 1)
    torch.testing.assert_close(ufm.optimum._solve(problem, gamma[:1]).x[0], optimum, rtol=0, atol=1e-10)


# ---------------------------------------------------------------- helpers

def test_unique_rows_groups_exactly_even_where_keys_collide():
    weights = np.sqrt(np.arange(1, 5)) + math.pi
    colliding = np.zeros((2, 4))
    colliding[0, 0], colliding[1, 1] = weights[1], weights[0]  # keys w1 w0 and w0 w1: equal in floating point
    T = torch.tensor(np.concatenate([colliding, colliding[::-1], np.eye(4)[[2, 2, 3]]]))
    assert float(T[0] @ torch.tensor(weights)) == float(T[1] @ torch.tensor(weights))
    for rows in (T, T[2:]):  # with and without the collision
        targets, inverse = ufm.problem._unique_rows(rows)
        assert torch.equal(targets[inverse], rows)
        assert targets.shape == (len(torch.unique(rows, dim=0)), 4) and inverse.shape == (len(rows),)


def test_no_rows_have_no_unique_rows():
    targets, inverse = ufm.problem._unique_rows(torch.zeros(0, 4, dtype=torch.float64))
    assert targets.shape == (0, 4) and inverse.shape == (0,)


@pytest.mark.parametrize("loss_name", ALL_LOSSES)
def test_no_targets_are_solved_as_none(loss_name):
    W, b = random_classifier(4, 6, seed=23)
    problem = ufm.problem._problem(W, b, torch.zeros(0, 4, dtype=torch.float64), loss_name, {})
    gammas = ufm.problem._gammas([0.1, 1.0], problem)
    asked = ufm.optimum._solve(problem, gammas, tangents=True)
    assert asked.x.shape == asked.tangent.shape == (2, 0, problem.S.shape[0])
    assert ufm.optimum._solve(problem, gammas).tangent is None  # tangents only where asked for, as for any targets


def test_finite_checks_large_and_small_tensors():
    for size in (7, 3 * 2 ** 16):
        tensor = torch.zeros(size, dtype=torch.float64)
        assert ufm.problem._finite(tensor)
        for bad in (math.nan, math.inf, -math.inf):
            tensor[size // 2] = bad
            assert not ufm.problem._finite(tensor)
            tensor[size // 2] = 0.0


def test_fit_runs_on_one_thread_and_restores_the_count(monkeypatch):
    seen = []
    original = ufm.search._search
    monkeypatch.setattr(ufm.fitting, "_search", lambda *args: seen.append(torch.get_num_threads()) or original(*args))
    W, b = random_classifier(4, 6, seed=18)
    T = mixup_targets(4)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ufm.fit(torch.randn(len(T), 6, dtype=torch.float64), T, W, b, "cross_entropy")
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
