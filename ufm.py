"""The mixup unconstrained-features optimum (Fisher, Meng & Papyan 2024, section 3) and its fit to
learned features. Pure functions on tensors, float64 throughout.

The optimum. With the classifier W (C, d), b (C,) fixed, the features of a point with soft target t
are free variables:

    h*(t) = argmin_h  l(W h + b, t) + (gamma / 2) |h|^2          (gamma > 0)

l is the per-sample loss of `losses.build_loss` (label smoothing, mse_scale and focal_gamma included):
T holds the raw mixup targets lam e_a + (1 - lam) e_b, and the loss smooths them (t~ below).

The reduction. Stationarity gives gamma h* = -W^T grad_z l, so h* lies in the row space of W. With
the thin SVD W = U S V^T of numerical rank r <= C (singular values below RANK_RTOL s_max count as
zero), h = x V and z = b + U S x: every solve has r unknowns, not d. The optimum depends on the target
only, so only the unique rows of T are solved (mixup points of one pair type and lambda share one),
and the result is scattered back to every row.

Solvers:
- mse: the closed form h* = (W^T W + gamma I)^-1 W^T (kappa t~ - b), i.e. x = S / (S^2 + gamma)
  U^T (kappa t~ - b), kappa = mse_scale.
- cross_entropy, focal, smooth_l1: Newton on the r coordinates, in one batch of rows that are
  independent problems: all unique targets, and in the fit all the gammas of a search level at once
  (each row has its own gamma). Each row starts from the lowest objective among its candidates: a
  neighbouring gamma's solution and its tangent line or cubic interpolation in log gamma, or cold
  starts (h = 0 and closed-form guesses, `_cold_starts`). The gradient is autograd's through
  `losses.build_loss` itself, so the stationary point is that of the run's loss whatever the Hessian
  and whatever the starts. The Hessian H_z of l in the logits is written out (`_logit_curvature`:
  cross-entropy and focal by the chain rule through log-softmax, focal's per-class term by hand;
  smooth_l1 diagonal), and the Newton system S U^T H_z U S + gamma I is solved in logit space as
  (P H_z P + gamma K^+ + Q) dz = -U S^-1 grad_x (K = W W^T, P and Q the projections onto U's
  columns and their complement): O(C^2) per point to assemble instead of O(C^2 r). Steps: Armijo
  backtracking; a full step that lowers f by more than its quadratic model predicts is doubled
  while f keeps falling (on a softmax's exponential tail Newton's step is far too short); near the
  solution, where f changes by less than its own rounding, a full step that halves the gradient is
  taken. The line search compares per-row values of the loss written out (`_row_losses`, checked
  against build_loss's batch mean): it picks steps, never the answer. Where C >= REUSE_MIN_CLASSES
  (factorisations dominate), a row in Newton's quadratic phase reuses its last factorisation.
  Stopping rule, per point: |grad_x f| <= STATIONARITY_RTOL gamma |x|, which bounds |x - x*| by
  1e-10 |x| where f is gamma-strongly convex; or, where that is below the rounding of the gradient
  itself, FLOOR_ULPS eps s_max (|grad_z l|_1 + k |t~|_1) (k = mse_scale for smooth_l1, else 1): this
  happens only at the smallest gammas for a nearly saturated softmax, where float64 fixes h* to
  about 1e-8. A point not converged in MAX_ITERATIONS steps raises SolverError, never a silent
  approximation.
- mae, not differentiable where a logit equals its target: the exact minimiser of the piecewise
  quadratic |A x + beta|_1 + gamma |x|^2 / 2 (A = U S, beta = b - kappa t~). Pieces are the sets E
  of logits held on their targets. Primal-dual active-set steps (`_mae_pieces`) jump from piece
  minimiser to piece minimiser, changing every wrong piece at once; the rows they do not certify
  within MAX_PIECE_STEPS continue with a primal active-set method (`_mae`), which moves to the next
  piece or to the current piece's minimiser, one change per step, until its multipliers certify
  optimality. Degenerate pieces (more logits on their targets than W has rank, ties) cannot make it
  cycle: the joining and the leaving logit follow Bland's rule (the lowest index), and a step or a
  rate within rounding of zero blocks nothing (DEGENERATE_RATE_RTOL, NEGLIGIBLE_STEP_RTOL); the tests
  perturb such cases by a few ulps, where a last bit had made it cycle on one CPU and not another. Either way the solver returns the unique minimiser (the objective is gamma-strongly
  convex) exactly, up to the rounding of its linear algebra: h* = -W^T u / gamma with u in
  [-1, 1]^C (to CERTIFICATE_RTOL), u_c = sign(r_c) wherever the logit residual
  r = W h* + b - kappa t~ is non-zero, and r_c = 0 (those logits sit exactly on their targets)
  where |u_c| < 1: the subgradient condition. u is the maximiser of the dual, max over [-1, 1]^C of
  u.(b - kappa t~) - |W^T u|^2 / (2 gamma). The one-change method alone needs a step for each logit
  that changes piece, a hundred or more at C = 100 between two grid gammas; the primal-dual steps
  need a few.

Convexity. mse, smooth_l1, mae and cross-entropy are convex in the logits, so the objective is
gamma-strongly convex in h and h* is unique. Focal (focal_gamma > 0) is not: its logit Hessian has
negative eigenvalues where the target class is strongly mispredicted (smallest found about -0.09 at
focal_gamma = 2, -0.23 at 5, one-hot or mixed targets, C = 5), so the objective is strongly convex
only when gamma exceeds s_max^2 times that magnitude. Otherwise the solver returns a local
minimiser: a point where the gradient vanishes to the tolerance and the Hessian is positive definite
(checked; a saddle raises SolverError), reached by steps that only descend from the start, the
candidate of lowest objective (a Newton matrix that is not positive definite is shifted by multiples
of gamma K^+, i.e. of the identity in h). From h = 0, and from the cold starts, which predict the
target, the iterates move towards predicting the target, away from the region of negative curvature.

The fit. For learned features H (n, d) of mixup points with targets T, and P the projection onto
the row space of W,

    min over s >= 0, gamma in the search range of  || P H - s H*(gamma) ||_F

One convention: H is not centred. The UFM has no free offset: its features are the variables that
the regulariser (gamma / 2) |h|^2 pulls to 0 and the network's own logits W h + b read. Centring H
by the mean of the class means mu while solving with b fitted the model H = mu + s H*(b), which is
not the UFM (issue 20: an exact optimum planted as H came back with a residual of 0.08 and gamma
7x off for mse); centring and solving with b + W mu instead would be a UFM whose regulariser pulls
towards mu, also a different model. Uncentred, features planted as s h*(T; W, b, gamma) give back
s and gamma (tests/test_ufm_planted.py). Of the residual, `scatter_floor` is what the scatter of the
rows that share a target sets alone, which no (s, gamma) explains (within-target collapse), and
`shape_residual` the residual of the per-target means, the distance to the optimum's shape.

For each gamma the best s is the least-squares scale max(0, <P H, H*>) / |H*|^2 (a negative
multiple of the optimum is no agreement with it: s = 0, residual 1). log gamma is searched on a grid
of GRID_PER_DECADE points per decade (MAE_GRID_PER_DECADE for mae), solved in one batch (or, where its Newton matrices would be
large, BATCH_ELEMENTS, one gamma after another from large to small, each from the last). Each
solution comes with its tangent dx/dlog gamma (differentiating stationarity: one more solve with
the last Newton factor), hence the residual's slope. The refinement (`_refine`) then goes to the
side of the best grid point where the residual falls, solves 1/6, 1/3 and 1/2 of the way to the
next grid point in one batch, and takes steps to the minimum of the cubic through the residuals
and slopes at the best point and its neighbour on that side, until that minimum is within
LOG_GAMMA_XATOL (1e-5) of a solved point (then one last such step, below it): a planted gamma comes
back to about 1e-6 and an exact optimum with a residual below 1e-6 (tests/test_ufm_planted.py; at the
earlier 1e-2 the residual of an exact optimum was 1e-6 to 1e-5), in a few levels after the grid.
mae's residual has kinks in log gamma (wherever a logit changes piece), where slopes mislead a cubic:
its refinement (`_refine_kinked`) is bounded Brent on the residual's values between the best grid
point's neighbours, to KINKED_XATOL.

The gamma range is GAMMA_RANGE times s_max^2 (s_max the largest singular value of W): the optimum's
shape depends on gamma only through gamma / |W|^2 (scaling W by a acts as dividing gamma by a^2). At
the top, 1e4 s_max^2, the optimum moves the logits by at most 1e-4 |grad_z l| (|W h*| <= s_max^2
|grad_z l| / gamma): it is the linear response -W^T grad l(b) / gamma, whose shape no larger gamma
changes. At the bottom, 1e-8 s_max^2, cross-entropy's optimum for a one-hot target has logit margins
near 18 (C = 10) to 20 (C = 100) with a simplex-ETF classifier, beyond those of trained networks;
there its shape changes only logarithmically in gamma. A fitted gamma at (within 2 LOG_GAMMA_XATOL
of) either end is flagged `gamma_at_bound`: the data prefer a gamma outside the range.

Speed (`python bench/ufm_speed.py --threads 1`, the project's idle 2-core CPU, best of 3, two runs).
The default digits run's capture (C = 10, d = 256, 2520 points, 60 targets): 0.029 to 0.031 s for
cross-entropy, 0.008 to 0.047 s over the five losses (before the batched solver: 0.12 to 0.28 s
for cross-entropy); `--run RUN` puts a run's fits beside its NC passes, 0.012 to 0.017 s on
digits, so the fit costs about twice the NC pass there. 3 x 6 x 4 x 21 points at d = 512, C = 100
(180 targets): 1.2 s for cross-entropy, 1.4 to 1.9 s focal, 1.2 to 1.5 s mae, 0.3 to 0.7 s
smooth_l1, 0.04 s mse (before: 1.3, 2.8, 7.8, 0.7 and 0.06 s). The cost is per torch call for
small problems (hence one batch for the grid, few levels after it, single-threaded: see
`_with_autograd`) and per Newton factorisation (m C^3 / 3) for large ones.

Not identifiable. Where the shape of H* (H* up to a positive factor) is the same at every grid gamma
to SHAPE_RTOL, gamma and s are not identifiable, only s H* is: e.g. mse with a simplex-ETF classifier
and b = 0, where H* = W^T (kappa t~) / (C/(C-1) + gamma). The fit then reports gamma = s = None,
`identifiable` False, and the residuals of the common shape. `curve_gamma` and `curve_scale` are
always a (gamma, s) pair that reproduces the fitted s H* (the fitted pair when identifiable), for
`theory_curve`. mae's shape is moreover constant over whole ranges of gamma: below the gamma at which
every logit that can sit on its target does (with r = C: H* = W^+ (kappa t~ - b), interpolation), and
above the one at which none does. A fit that lands in such a range returns one gamma of it, with the
same residual as any other: there, gamma is only bounded, not determined (the refinement stops
where the residual's change across its bracket is within rounding, FLAT_ULPS).
"""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.optimize import minimize_scalar
import torch.nn.functional as F
from torch.func import vmap

from losses import LOSSES, build_loss, focal, smooth_targets

LOSS_OPTIONS = ("label_smoothing", "mse_scale", "focal_gamma")
SOFTMAX_LOSSES = ("cross_entropy", "focal")
NEWTON_LOSSES = ("cross_entropy", "focal", "smooth_l1")
SMOOTH_L1_BETA = 1.0  # losses.smooth_l1's beta: its curvature is 1 where |z - kappa t~| < beta
FOCAL_GAMMA = inspect.signature(focal).parameters["focal_gamma"].default  # losses.focal's default
STATIONARITY_RTOL = 1e-10
EPS = float(torch.finfo(torch.float64).eps)
# The gradient's rounding level, in ulps of the magnitudes it is a difference of.
FLOOR_ULPS = 64.0
# Singular values of W below this fraction of the largest count as zero. Above it, K^+ adds at
# most 1 / RANK_RTOL^2 = 1e12 to the condition number of the logit-space Newton system.
RANK_RTOL = 1e-6
MAX_ITERATIONS = 200
ARMIJO_SLOPE = 1e-4
MAX_BACKTRACKS = 60
ARMIJO_ULPS = 8.0        # Armijo's test forgives this many ulps of f
# Near the solution (Newton decrement^2 below NEAR_DECREMENT (1 + |f|), far above f's rounding and
# far below any decrease that matters) a full Newton step that shrinks the gradient this much is taken.
NEAR_DECREMENT = 1e-10
GRADIENT_DECREASE = 0.5
# A row whose last step was a full Newton step with decrement^2 below REUSE_DECREMENT (1 + |f|) (the
# quadratic phase) reuses its last factor where C >= REUSE_MIN_CLASSES (see _refresh).
REUSE_DECREMENT = 1e-8
REUSE_MIN_CLASSES = 32
# A full step that lowers f by more than EXPANSION_RATIO times the decrease of Newton's quadratic
# model is doubled while f keeps falling, at most MAX_EXPANSIONS times (see _expand).
EXPANSION_RATIO = 1.1
MAX_EXPANSIONS = 6
# Where the grid's k gammas x m targets x C^2 entries of Newton matrices exceed this, they are solved
# one gamma after the other: beyond a few MB the batch's memory traffic costs more than its calls save.
BATCH_ELEMENTS = 2 ** 20
# Cold starts of the softmax losses: the least-squares logits log(t~ + c gamma / s_max^2), for each c.
COLD_START_SCALES = (0.1, 1.0, 10.0, 100.0)
ROW_LOSS_RTOL = 1e-10    # _row_losses against build_loss's batch mean: rounding, far below any formula slip
GAMMA_RANGE = (1e-8, 1e4)  # in units of s_max^2, see the module docstring
GRID_PER_DECADE = 0.5    # a grid point every two decades: the shape changes slowly in log gamma
MAE_GRID_PER_DECADE = 2.0  # mae's optimum changes by pieces (its active set): the residual can have a
                           # minimum narrower than two decades (a planted 0.2 s_max^2 was fitted at 0.01)
LOG_GAMMA_XATOL = 1e-5     # natural log: a planted gamma comes back to about 1e-6 (tests/test_ufm_planted.py)
KINKED_XATOL = 1e-6       # mae's Brent: no superlinear last step to sharpen it (see _refine_kinked)
POLISH = 0.1            # a cubic step below LOG_GAMMA_XATOL is still taken, once, unless below this fraction of it
FLAT_ULPS = 64.0         # a residual that changes by less than this many ulps of |P H|^2 across a bracket is flat
REFINE_FRACTIONS = (1 / 6, 1 / 3, 1 / 2)  # the refinement's first level, in fractions of the way to the next grid point
MAX_REFINE_STEPS = 30    # the refinement's levels after the grid; it needs 2 to 5 (see _refine)
SHAPE_RTOL = 1e-6  # a network's float32 W (rounding 6e-8) splits singular values that are equal in exact
                   # arithmetic by ~4e-8, which moves the optimum's shape by ~3e-8 across the gamma range
# mae: residuals below ZERO_RTOL max(1, |b - kappa t~|) count as zero at a warm start; multipliers
# up to 1 + CERTIFICATE_RTOL count as inside [-1, 1].
ZERO_RTOL = 1e-12
CERTIFICATE_RTOL = 1e-10
# mae: a residual off E whose rate along a step is within this fraction of |a_c| |step| of zero does not
# block the step. Such a residual's row is (to rounding) in the span of E's rows, so the step keeps it
# where it is; blocking on the sign of its rounding made the active set swap one logit in and out for
# ever (seen on an AMD EPYC, where the last bit of a product differs from an Intel Xeon's).
DEGENERATE_RATE_RTOL = 1e-12
# mae: a step shorter than this fraction of the largest |x| any piece can have (sum_c |a_c| / gamma,
# from x = -A^T u / gamma, |u| <= 1) is rounding, not a move: where E's rows are dependent, releasing
# one leaves the piece minimiser where it is, and the rounding of the new minimiser pointed anywhere,
# so that the released logit blocked the step and joined E again, for ever.
NEGLIGIBLE_STEP_RTOL = 1e-12
MAX_PIECE_STEPS = 30  # mae's primal-dual active-set steps before the (one change per step) active-set method
MAX_ACTIVE_SET_STEPS = 2000  # one change of E per step: far above the pieces C <= a few hundred visit


class SolverError(RuntimeError):
    """The optimum was not found to the tolerance (no convergence, a saddle, no descent): never approximated."""


class UFMFit(NamedTuple):
    metrics: dict        # plain Python values, see `fit`
    H_fit: torch.Tensor  # (n, d) float64: s H*(gamma) at the fitted gamma, rows as H


def _with_autograd(function):
    """Run with autograd on, even under torch.inference_mode (the feature capture runs in it), and on
    one torch thread, restored after: the solvers' many small ops lose far more to OpenMP's
    start-up and, on a shared machine, to waiting for busy cores than intra-op threads save (the
    digits fit: 0.02 s on one thread, 0.1 to 0.3 s on two on a loaded 2-core machine)."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.inference_mode(False), torch.enable_grad():
                return function(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return wrapper


# ---------------------------------------------------------------- public

def optimal_features(W, b, T, loss_name: str, gamma: float, **loss_options) -> torch.Tensor:
    """(n, d) float64 optimum h*(t_i) of every target row T[i] (see the module docstring).

    W (C, d), b (C,) or None, T (n, C) raw soft targets (label smoothing is applied as the loss
    does); loss_options: label_smoothing, mse_scale, focal_gamma, as for `losses.build_loss`.
    Tensors (any device) or numpy arrays.
    """
    _check_gamma(gamma)
    problem = _problem(W, b, T, loss_name, loss_options)
    return problem.features(_solve(problem, _gammas(gamma, problem)).x[0])


def newton_features(W, b, T, loss_name: str, gamma: float, **loss_options) -> torch.Tensor:
    """`optimal_features` through the Newton solver for any differentiable loss, mse included:
    the generic path, exposed so that it can be checked against mse's closed form."""
    _check_gamma(gamma)
    if loss_name == "mae":
        raise ValueError("mae is not differentiable: its optimum comes from the active-set method, not Newton")
    problem = _problem(W, b, T, loss_name, loss_options)
    gammas = _gammas(gamma, problem).expand(problem.targets.shape[0])
    start = torch.zeros(problem.targets.shape[0], problem.S.shape[0], dtype=torch.float64, device=problem.S.device)
    return problem.features(_newton(problem, gammas, problem.targets, problem.smoothed, start)[0])


def theory_curve(W, b, pair: Sequence[int], lambdas, loss_name: str, gamma: float, scale: float,
                 **loss_options) -> torch.Tensor:
    """(len(lambdas), d) float64: scale * h*(lam e_a + (1 - lam) e_b) for pair = (a, b), every lam.

    With a fit's `curve_gamma` and `curve_scale`: the theory's curve of one pair type, to draw
    through the learned points. It models P H, the features as the network computes them: a figure
    that centres the features subtracts the same centre from the curve.
    """
    W = _as_float64(W)
    lam = _as_float64(lambdas, W.device).reshape(-1, 1)
    eye = torch.eye(W.shape[0], dtype=torch.float64, device=W.device)
    first, second = (int(c) for c in pair)
    return scale * optimal_features(W, b, lam * eye[first] + (1 - lam) * eye[second], loss_name, gamma,
                                     **loss_options)


def fit(H, T, W, b, loss_name: str, *, same_class=None, gamma_range: Tuple[float, float] = GAMMA_RANGE,
        **loss_options) -> UFMFit:
    """The s >= 0 and gamma for which s H*(gamma) best matches P H (see the module docstring).

    H (n, d) learned features of mixup points with raw targets T (n, C), as the network computes
    them (not centred: see "One convention" in the module docstring); W (C, d), b (C,) or None the
    classifier whose optimum is fitted. `same_class` (n,) bool
    marks the same-class points; by default the rows whose target has a single non-zero entry (so
    different-class pairs at lam = 0 or 1, whose inputs are clean images, count as same-class).
    `gamma_range` is in units of s_max^2, the largest squared singular value of W.

    Returns UFMFit(metrics, H_fit); H_fit is the (n, d) float64 tensor s H* at the fitted gamma,
    and metrics holds plain Python values:
      gamma, scale            the fit; None when not identifiable
      identifiable            False when the shape of H* is the same at every searched gamma
      gamma_at_bound          the fitted gamma is an end of the search range
      residual, residual_same_class, residual_diff_class
                              |P H - s H*|_F / |P H|_F over all / same- / different-class rows (NaN
                              for an empty group)
      scatter_floor           the residual that the scatter of the rows sharing a target sets alone:
                              sqrt(sum_i |P h_i - m_j(i)|^2) / |P H|_F, m_j the mean of P h over the rows
                              of target j; no s and gamma go below it
      shape_residual          the residual of those per-target means, which the optimum's shape must
                              explain: sqrt(sum_j n_j |m_j - s h*_j|^2 / sum_j n_j |m_j|^2); the
                              distance to the optimum once within-target collapse is set aside.
                              residual^2 = scatter_floor^2 + shape_residual^2 (1 - scatter_floor^2)
      outside_share           |(I-P)H|^2 / |H|^2
      residual_gamma_spread   largest minus smallest residual over the gamma grid: how much gamma matters
      curve_gamma, curve_scale  a (gamma, s) that reproduces H_fit, for `theory_curve`
      gamma_range             [low, high] searched, absolute
      nan_reason              None, or why the numbers are NaN and gamma None (non-finite input,
                              features without a component in the row space, an optimum that is
                              h = 0 for every target and gamma); H_fit is NaN then
    """
    _check_loss(loss_name, loss_options)
    W64, b64, T64 = _classifier(W, b, T)
    features = H if isinstance(H, torch.Tensor) else torch.from_numpy(np.asarray(H))
    H64 = _as_float64(features, W64.device)
    if H64.dim() != 2 or H64.shape != (T64.shape[0], W64.shape[1]):
        raise ValueError(f"H must be (n, d) = ({T64.shape[0]}, {W64.shape[1]}), got {tuple(H64.shape)}")
    low, high = (float(v) for v in gamma_range)
    if not (0 < low < high and math.isfinite(high)):
        raise ValueError(f"gamma_range must be 0 < low < high < inf, got {gamma_range}")
    same = _same_class_mask(same_class, T64)
    # H as given: float32 features are half the bytes of their float64 copy
    for name, tensor in (("H", features), ("W", W64), ("b", b64), ("T", T64)):
        if not _finite(tensor):
            return UFMFit(_nan_metrics(f"{name} is not finite", [math.nan, math.nan]), torch.full_like(H64, math.nan))

    problem = _problem(W64, b64, T64, loss_name, loss_options)
    absolute = [low * float(problem.S[0]) ** 2, high * float(problem.S[0]) ** 2]
    data = _data(problem, H64)  # H64 is projected in place: no more copies of (n, d)
    if data.inside == 0.0:
        return UFMFit(_nan_metrics("the features have no component in the row space of W", absolute),
                      torch.full_like(H64, math.nan))
    solutions = _Solutions(problem, data)
    log_gamma, spread, varies, at_bound = _search(solutions, math.log(absolute[0]), math.log(absolute[1]))
    if _optimum_is_zero(solutions):
        return UFMFit(_nan_metrics("the optimum is h = 0 for every target at every gamma (e.g. mae with a "
                                   "classifier whose rows sum to zero and no bias): no shape to fit", absolute),
                      torch.full_like(H64, math.nan))
    point = solutions.points[log_gamma]
    scale = point.scale
    fitted = scale * point.x[problem.inverse]
    everything = torch.ones_like(same)
    metrics = {
        "gamma": math.exp(log_gamma) if varies else None,
        "scale": scale if varies else None,
        "identifiable": varies,
        "gamma_at_bound": varies and at_bound,
        "residual": _group_residual(data.Y, fitted, everything),
        "residual_same_class": _group_residual(data.Y, fitted, same),
        "residual_diff_class": _group_residual(data.Y, fitted, ~same),
        "scatter_floor": math.sqrt(data.scatter / data.inside),
        "shape_residual": _shape_residual(data, point),
        "outside_share": data.outside / (data.outside + data.inside),
        "residual_gamma_spread": spread,
        "curve_gamma": math.exp(log_gamma),
        "curve_scale": scale,
        "gamma_range": absolute,
        "nan_reason": None,
    }
    return UFMFit(metrics, fitted @ problem.V)


# By assignment, not as @_with_autograd: mutmut (bench/mutation.py) leaves decorated functions unmutated.
optimal_features, newton_features, fit = map(_with_autograd, (optimal_features, newton_features, fit))


# ---------------------------------------------------------------- inputs and the reduced problem

@dataclass
class _Problem:
    """One classifier, loss and set of unique targets, in the row-space coordinates of W."""
    loss_name: str
    loss: Callable
    unsmoothed_loss: Callable  # the same loss without label smoothing
    kappa: float             # mse_scale
    focal_gamma: float       # focal's focusing parameter (for `_row_losses`)
    targets: torch.Tensor    # (m, C) unique raw target rows
    smoothed: torch.Tensor   # (m, C) the same rows after label smoothing
    inverse: torch.Tensor    # (n,) row of `targets` of each input row
    b: torch.Tensor          # (C,)
    V: torch.Tensor          # (r, d) orthonormal basis of the row space of W
    U: torch.Tensor          # (C, r)
    S: torch.Tensor          # (r,) singular values, largest first
    N: torch.Tensor          # (C, C - r) orthonormal basis of the complement of U's columns

    def __post_init__(self):
        self.US = self.U * self.S              # z = b + x (U S)^T, grad_x l = grad_z l (U S)
        self.U_over_S = self.U / self.S        # dx = dz U S^-1 for dz in the span of U
        self.K_pinv = self.U_over_S @ self.U_over_S.T  # K^+ = U S^-2 U^T, K = W W^T
        self.complement = self.N @ self.N.T    # Q
        # views made once: the solvers' loops are dominated by the count of torch calls
        self.US_T, self.U_over_S_T, self.minus_U_over_S = self.US.T, self.U_over_S.T, -self.U_over_S

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b, x, self.US_T)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(n, d) optimum of every input row from the (m, r) coordinates of the unique targets."""
        return x[self.inverse] @ self.V


def _as_float64(value, device=None) -> torch.Tensor:
    """A float64 copy: never an inference tensor, which autograd could not use."""
    tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
    return tensor.to(device=device, dtype=torch.float64, copy=True)


def _check_loss(loss_name: str, loss_options: dict) -> None:
    if loss_name not in LOSSES:
        raise ValueError(f"unknown loss {loss_name!r}; choose from {', '.join(LOSSES)}")
    unknown = sorted(set(loss_options) - set(LOSS_OPTIONS))
    if unknown:  # losses' builders ignore unknown options: a typo would pass silently
        raise ValueError(f"unknown loss option(s) {', '.join(unknown)}; the options are {', '.join(LOSS_OPTIONS)}")


def _check_gamma(gamma: float) -> None:
    if not (math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be a positive finite number, got {gamma}")


def _classifier(W, b, T) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    W = _as_float64(W)
    device = W.device
    T = _as_float64(T, device)
    b = torch.zeros(W.shape[0], dtype=torch.float64, device=device) if b is None else _as_float64(b, device)
    if W.dim() != 2 or b.shape != (W.shape[0],) or T.dim() != 2 or T.shape[1] != W.shape[0]:
        raise ValueError(f"W must be (C, d), b (C,) and T (n, C), got {tuple(W.shape)}, {tuple(b.shape)} "
                         f"and {tuple(T.shape)}")
    return W, b, T


def _problem(W, b, T, loss_name: str, loss_options: dict) -> _Problem:
    """Unique targets and the row space of W, after checking the inputs."""
    _check_loss(loss_name, loss_options)
    W, b, T = _classifier(W, b, T)
    if not all(_finite(tensor) for tensor in (W, b, T)):
        raise ValueError("W, b and T must be finite")
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    if not S.numel() or S[0] == 0:
        raise ValueError("W is zero: the optimum is h = 0 for every target")
    rank = int((S > RANK_RTOL * S[0]).sum())
    complete, _ = torch.linalg.qr(U[:, :rank], mode="complete")
    targets, inverse = _unique_rows(T)
    unsmoothed = {key: value for key, value in loss_options.items() if key != "label_smoothing"}
    return _Problem(
        loss_name, build_loss(loss_name, **loss_options), build_loss(loss_name, **unsmoothed),
        float(loss_options.get("mse_scale", 1.0)), float(loss_options.get("focal_gamma", FOCAL_GAMMA)), targets,
        smooth_targets(targets, loss_options.get("label_smoothing", 0.0)), inverse, b,
        Vh[:rank], U[:, :rank], S[:rank], complete[:, rank:])


class _Solved(NamedTuple):
    x: torch.Tensor                  # (k, m, r) optimum coordinates of the unique targets at k gammas
    tangent: Optional[torch.Tensor]  # (k, m, r) their derivative in log gamma, where asked for


def _finite(tensor: torch.Tensor) -> bool:
    """Whether every entry is finite. Large tensors: their extremes are (NaN propagates to both),
    without the boolean temporary of torch.isfinite, which costs more than the test."""
    if tensor.numel() <= 2 ** 16:
        return bool(torch.isfinite(tensor).all())
    return bool(torch.isfinite(torch.stack(torch.aminmax(tensor))).all())


def _unique_rows(T: torch.Tensor):
    """torch.unique(T, dim=0, return_inverse=True) up to the order of the unique rows, ten times
    faster: rows are grouped by a scalar key (a projection on fixed incommensurate weights), and the
    grouping is kept only if every row equals its group's representative exactly."""
    weights = torch.arange(1, T.shape[1] + 1, dtype=torch.float64, device=T.device).sqrt() + math.pi
    _, inverse = torch.unique(T @ weights, return_inverse=True)
    targets = T.new_empty(int(inverse.max()) + 1 if inverse.numel() else 0, T.shape[1])
    targets[inverse] = T
    if torch.equal(targets[inverse], T):
        return targets, inverse
    return torch.unique(T, dim=0, return_inverse=True)


def _solve(problem: _Problem, gammas: torch.Tensor, starts: Sequence[torch.Tensor] = (), cold: bool = True,
           tangents: bool = False) -> _Solved:
    """The optimum of every unique target at each of the k gammas, all in one batch (the rows are
    independent problems). starts: candidate starting points (k, m, r); Newton takes per row the one
    of lowest objective, cold starts included if `cold` (see _cold_starts); mae the first, else
    h = 0. With `tangents`, also dx/dlog gamma, for the fit's search."""
    m, r = problem.targets.shape[0], problem.S.shape[0]
    if m == 0:  # no targets: nothing to solve (the Newton path's checks need a row)
        empty = problem.targets.new_zeros(len(gammas), 0, r)
        return _Solved(empty, empty if tangents else None)
    if problem.loss_name == "mse":
        shrink = problem.S / (problem.S.square() + gammas[:, None, None])
        x = ((problem.kappa * problem.smoothed - problem.b) @ problem.U) * shrink
        return _Solved(x, -gammas[:, None, None] * x * shrink / problem.S if tangents else None)
    gamma = gammas.repeat_interleave(m)
    smoothed = problem.smoothed.repeat(len(gammas), 1)
    flat = [start.reshape(-1, r) for start in starts]
    if problem.loss_name == "mae":
        x, tangent = _mae(problem, gamma, smoothed, flat[0] if flat else None, tangents)
    else:
        candidates = flat + (_cold_starts(problem, gamma, smoothed) if cold or not flat else [])
        x, tangent = _newton(problem, gamma, problem.targets.repeat(len(gammas), 1), smoothed,
                             _lowest(problem, gamma, smoothed, candidates), tangents)
    return _Solved(x.view(len(gammas), m, r), None if tangent is None else tangent.view(len(gammas), m, r))


def _gammas(values, problem: _Problem) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float64, device=problem.S.device).reshape(-1)


# ---------------------------------------------------------------- the smooth losses: Newton

def _newton(problem: _Problem, gamma: torch.Tensor, targets: torch.Tensor, smoothed: torch.Tensor,
            start: torch.Tensor, tangents: bool = False):
    """(x (M, r), dx/dlog gamma (M, r) or None): the optimum coordinates of a differentiable loss for
    M rows, each with its own raw target, smoothed target and gamma (M,), from `start` (M, r); see
    the module docstring. Converged rows leave the batch."""
    every_gamma, every_smoothed = gamma, smoothed
    x = start.clone()
    solution = torch.empty_like(x)
    last_factors = _LastFactors(x.shape[0], problem.targets.shape[1], x.device) if tangents else None
    rows = torch.arange(x.shape[0], device=x.device)
    half_gamma = 0.5 * gamma
    tolerance = (STATIONARITY_RTOL * gamma).square()
    floor_offset = (1.0 if problem.loss_name in SOFTMAX_LOSSES else problem.kappa) * smoothed.abs().sum(dim=1)
    floor_scale = FLOOR_ULPS * EPS * float(problem.S[0])
    z = problem.logits(x)
    gz, mean_loss = _gradient(problem, z, targets)
    losses = _row_losses(problem, z, smoothed)
    _check_row_losses(problem, losses, mean_loss)
    f = torch.addcmul(losses, half_gamma, torch.linalg.vecdot(x, x))
    factor = None  # of the last Newton matrix, rows as x
    settled = None  # rows whose last step was a full Newton step in the quadratic phase (see REUSE_DECREMENT)
    reuse = problem.targets.shape[1] >= REUSE_MIN_CLASSES
    for _ in range(MAX_ITERATIONS):
        gx = torch.addcmul(gz @ problem.US, gamma[:, None], x)
        # |grad_x f| <= max(STATIONARITY_RTOL gamma |x|, floor), squared
        floor = floor_scale * (torch.linalg.vector_norm(gz, ord=1, dim=1) + floor_offset)
        done = torch.linalg.vecdot(gx, gx) <= torch.maximum(tolerance * torch.linalg.vecdot(x, x), floor.square())
        if bool(done.any()):
            finished = torch.nonzero(done).flatten()
            solution[rows[finished]] = x[finished]
            if last_factors is not None and factor is not None:
                last_factors.keep(rows[finished], factor[finished])
            kept = torch.nonzero(~done).flatten()
            if kept.numel() == 0:
                return solution, _finish(problem, every_gamma, every_smoothed, solution, last_factors)
            rows, targets, smoothed, gamma, half_gamma, tolerance, floor_offset, x, z, f, gz, gx = (
                value.index_select(0, kept) for value in (rows, targets, smoothed, gamma, half_gamma, tolerance,
                                                          floor_offset, x, z, f, gz, gx))
            if settled is not None:
                factor, settled = factor.index_select(0, kept), settled.index_select(0, kept)
        factor = _refresh(problem, gamma, z, smoothed, factor, settled if reuse else None)
        dx = _cholesky_solve(factor, gx @ problem.U_over_S_T) @ problem.minus_U_over_S
        x, z, f, settled = _line_search(problem, gamma, half_gamma, targets, smoothed, x, f, dx, gx)
        gz = _gradient(problem, z, targets)[0]
    raise SolverError(f"ufm: {problem.loss_name} optimum not converged in {MAX_ITERATIONS} Newton steps "
                       f"(gamma = {float(gamma.min()):.3g} to {float(gamma.max()):.3g}, {len(rows)} targets left)")


def _refresh(problem: _Problem, gamma, z, smoothed, factor, settled) -> torch.Tensor:
    """The Newton matrices' factors: new ones, except, where `settled` is given, for the rows whose last
    step was a full step in Newton's quadratic phase. There the Hessian has changed by about that
    step, far below itself, so the last factor gives a step as good (the error falls from e to about
    e times the last step, itself about the previous e) for two triangular solves instead of a
    factorisation. Only for large C (REUSE_MIN_CLASSES), where factorisations dominate the cost."""
    if settled is None or not bool(settled.any()):
        return _factor(_newton_matrix(problem, gamma, z, smoothed), problem, gamma)
    stale = torch.nonzero(~settled).flatten()
    if stale.numel():  # in place: the last factors are this iteration's alone (kept ones were copied)
        factor[stale] = _factor(_newton_matrix(problem, gamma[stale], z[stale], smoothed[stale]), problem, gamma[stale])
    return factor


class _LastFactors:
    """The factor of each row's last Newton matrix, kept as rows converge."""

    def __init__(self, count: int, size: int, device):
        self.factors = torch.empty(count, size, size, dtype=torch.float64, device=device)
        self.kept = torch.zeros(count, dtype=torch.bool, device=device)

    def keep(self, rows, factors) -> None:
        self.factors[rows], self.kept[rows] = factors, True


def _finish(problem: _Problem, gamma, smoothed, x, last_factors: Optional[_LastFactors]) -> Optional[torch.Tensor]:
    """Focal's check that the converged rows are minima, and the tangents where asked for (else None).

    The tangent is dx/dlog gamma = -gamma (S U^T H_z U S + gamma I)^-1 x, from differentiating the
    stationarity condition. The Hessian's factor is that of the row's last Newton step (its point
    differs from the solution by that step, far below what the search needs), or one at the
    solution where there is none, and for focal, whose check computes it anyway.
    """
    if problem.loss_name == "focal":  # the one loss that is not convex
        factors = _minimum_factor(_newton_matrix(problem, gamma, problem.logits(x), smoothed))
    elif last_factors is None:
        return None
    else:
        factors, fresh = last_factors.factors, torch.nonzero(~last_factors.kept).flatten()
        if fresh.numel():
            factors[fresh] = _factor(_newton_matrix(problem, gamma[fresh], problem.logits(x[fresh]), smoothed[fresh]),
                                     problem, gamma[fresh])
    if last_factors is None:
        return None
    return _cholesky_solve(factors, (gamma[:, None] * x) @ problem.U_over_S_T) @ problem.minus_U_over_S


def _cold_starts(problem: _Problem, gamma: torch.Tensor, smoothed: torch.Tensor) -> list:
    """Starting points (M, r) without a solution nearby: h = 0 and closed-form guesses. Softmax
    losses: the least-squares fit of the logits log(t~ + c gamma / s_max^2), centred, for c in
    COLD_START_SCALES (the optimum's logit gaps grow like log(1 / gamma), and Newton from h = 0 moves
    them by about 1 per step); smooth_l1: mse's optimum. Only where Newton starts from: the
    answer is its own."""
    zeros = torch.zeros(smoothed.shape[0], problem.S.shape[0], dtype=torch.float64, device=smoothed.device)
    if problem.loss_name in SOFTMAX_LOSSES:
        relative = gamma[:, None] / float(problem.S[0]) ** 2
        logits = torch.stack([torch.log(smoothed + scale * relative) for scale in COLD_START_SCALES])
        return [zeros, *((logits - logits.mean(dim=2, keepdim=True) - problem.b) @ problem.U_over_S)]
    if problem.loss_name == "smooth_l1":
        shrink = problem.S / (problem.S.square() + gamma[:, None])
        return [zeros, ((problem.kappa * smoothed - problem.b) @ problem.U) * shrink]
    return [zeros]


def _lowest(problem: _Problem, gamma: torch.Tensor, smoothed: torch.Tensor, candidates: list) -> torch.Tensor:
    """(M, r): per row, the candidate of lowest objective."""
    if len(candidates) == 1:
        return candidates[0]
    stacked = torch.stack(candidates)
    k, M, r = stacked.shape
    values = _row_objective(problem, gamma.repeat(k), smoothed.repeat(k, 1), stacked.view(-1, r)).view(k, M)
    return stacked[values.argmin(dim=0), torch.arange(M, device=stacked.device)]


def _row_losses(problem: _Problem, z, t_smooth) -> torch.Tensor:
    """(m,) per-row losses, for the line search and the choice of starts only: losses.py's
    per-sample loss written out on the smoothed targets (vmapped over the rows for a loss without a
    written form). The gradient, hence the optimum, is always autograd's through build_loss."""
    name = problem.loss_name
    if name in SOFTMAX_LOSSES:
        log_p = torch.log_softmax(z, dim=1)
        if name == "focal":
            weight = (-torch.expm1(log_p)).clamp(min=torch.finfo(log_p.dtype).tiny).pow(problem.focal_gamma)
            return -torch.linalg.vecdot(t_smooth * weight, log_p)
        return -torch.linalg.vecdot(t_smooth, log_p)
    if name == "mse":
        residual = z - problem.kappa * t_smooth
        return 0.5 * torch.linalg.vecdot(residual, residual)
    if name == "mae":
        return torch.linalg.vector_norm(z - problem.kappa * t_smooth, ord=1, dim=1)
    if name == "smooth_l1":
        return F.smooth_l1_loss(z, problem.kappa * t_smooth, reduction="none", beta=SMOOTH_L1_BETA).sum(dim=1)
    return vmap(lambda row, target: problem.unsmoothed_loss(row[None], target[None]))(z, t_smooth)


def _check_row_losses(problem: _Problem, losses: torch.Tensor, mean_loss: torch.Tensor) -> None:
    """The written-out per-row losses must average to build_loss's batch mean: a loss changed in
    losses.py without `_row_losses` would mislead the line search (never the optimum, which the
    gradient fixes, but its convergence)."""
    if not abs(float(losses.mean() - mean_loss)) <= ROW_LOSS_RTOL * (1.0 + float(losses.abs().mean())):
        raise SolverError(f"ufm: the per-row {problem.loss_name} of _row_losses (mean {float(losses.mean()):.17g}) "
                          f"disagrees with losses.build_loss ({float(mean_loss):.17g})")


def _row_objective(problem: _Problem, gamma, t_smooth, x) -> torch.Tensor:
    return _objective_and_logits(problem, 0.5 * gamma, t_smooth, x)[0]


def _objective_and_logits(problem: _Problem, half_gamma, t_smooth, x):
    """((m,) per-row objectives l(z, t~) + gamma |x|^2 / 2, (m, C) logits z) at x (m, r)."""
    z = problem.logits(x)
    return torch.addcmul(_row_losses(problem, z, t_smooth), half_gamma, torch.linalg.vecdot(x, x)), z


def _gradient(problem: _Problem, z, t, create_graph: bool = False):
    """((m, C) per-row gradients of the loss in the logits, the batch-mean loss).

    autograd through the loss itself: rows are independent, so the per-row gradients are those of
    m times the batch mean. torch.autograd rather than torch.func, whose first call costs seconds.
    """
    leaf = z.detach().requires_grad_()
    value = problem.loss(leaf, t)
    gradient, = torch.autograd.grad(value * z.shape[0], leaf, create_graph=create_graph)
    return gradient, value.detach()


def _x_gradient(problem: _Problem, gamma, t, x) -> torch.Tensor:
    """(m, r) gradient of the objective in the row-space coordinates: S U^T grad_z l + gamma x."""
    return torch.addcmul(_gradient(problem, problem.logits(x), t)[0] @ problem.US, gamma[:, None], x)


def _penalty(problem: _Problem, gamma: torch.Tensor) -> torch.Tensor:
    """(k, C, C) gamma K^+ + Q for each row's gamma: the penalty's Hessian in the logits, plus a
    unit block on the complement of U's columns (any positive block: the right-hand side has no
    component there)."""
    penalty = gamma[:, None, None] * problem.K_pinv
    return penalty + problem.complement if problem.N.shape[1] else penalty


def _newton_matrix(problem: _Problem, gamma: torch.Tensor, z, t_smooth) -> torch.Tensor:
    """(m, C, C) P H_z P + gamma K^+ + Q: the x-space Hessian S U^T H_z U S + gamma I in logit space.
    H_z = diag(d) - L R^T with L, R of rank <= 2, so that where N is empty it costs O(C^2) per row."""
    diagonal, left, right = _logit_curvature(problem, z, t_smooth)
    matrix = _penalty(problem, gamma)
    if problem.N.shape[1]:
        hz = torch.diag_embed(diagonal) - (left @ right.mT if left is not None else 0.0)
        return matrix + _project(hz, problem.N)
    if left is not None:
        if left.shape[2] == 1:
            matrix.addcmul_(left, right.mT, value=-1.0)  # an outer product, in place: no (m, C, C) temporary
        else:
            matrix.baddbmm_(left, right.mT, alpha=-1.0)
    matrix.diagonal(dim1=1, dim2=2).add_(diagonal)
    return matrix


def _logit_curvature(problem: _Problem, z, t_smooth):
    """H_z = diag(d) - L R^T as (d (m, C), L (m, C, k) or None, R (m, C, k) or None), k <= 2.

    mse: 1. smooth_l1 (Huber): 1 where |z - kappa t~| < beta, else 0. The softmax losses are
    l = sum_c t~_c phi(q_c), q = log softmax(z); with a = t~ phi'(q), b = t~ phi''(q), A = sum a,
    B = sum b, the chain rule gives H_z = diag(b - A p) - b p^T - p b^T + (A + B) p p^T, that is
    L = [c, p], R = [p, c] with c = b - (A + B) p / 2. Cross-entropy: phi(q) = -q, b = 0, so that
    H_z = s (diag(p) - p p^T) with s = sum t~: rank 1, L = s p, R = p.
    """
    name = problem.loss_name
    if name == "mse":
        return torch.ones_like(z), None, None
    if name == "smooth_l1":
        return ((z - problem.kappa * t_smooth).abs() < SMOOTH_L1_BETA).double(), None, None
    p = torch.softmax(z, dim=1)
    if name == "cross_entropy":
        scaled = t_smooth.sum(dim=1, keepdim=True) * p
        return scaled, scaled[:, :, None], p[:, :, None]
    first, second = _class_term_derivatives(problem, torch.log_softmax(z, dim=1))
    a, b = t_smooth * first, t_smooth * second
    A, B = a.sum(dim=1, keepdim=True), b.sum(dim=1, keepdim=True)
    c = b - 0.5 * (A + B) * p
    return b - A * p, torch.stack([c, p], dim=2), torch.stack([p, c], dim=2)


def _class_term_derivatives(problem: _Problem, q: torch.Tensor):
    """phi'(q), phi''(q) of focal's per-class term: focal is sum_c t_c phi(log p_c) with, as in
    losses.focal, phi(q) = -w q, w = max(1 - e^q, tiny)^g (g = focal_gamma). With p = e^q and
    u = max(1 - p, tiny) (the clamp passes no derivative where it binds):
        phi'  = -w + g q p u^(g-1),     phi'' = g p u^(g-2) (2 u + q (u - (g - 1) p)).
    q stays below 0 by a hair, so that u is finite where p rounds to 1. They set Newton's speed,
    never its answer (that is the gradient's, autograd's through build_loss)."""
    tiny = torch.finfo(torch.float64).tiny
    g = problem.focal_gamma
    if g == 0:  # cross-entropy
        return -torch.ones_like(q), torch.zeros_like(q)
    q = q.clamp(max=-tiny)
    p = torch.exp(q)
    u = -torch.expm1(q)
    free = u >= tiny
    u = u.clamp(min=tiny)
    first = torch.where(free, g * q * p * u.pow(g - 1), 0.0) - u.pow(g)
    second = torch.where(free, g * p * u.pow(g - 2) * (2 * u + q * (u - (g - 1) * p)), 0.0)
    return first, second


def _project(hz: torch.Tensor, N: torch.Tensor) -> torch.Tensor:
    """P H P with P = I - N N^T, in O(C^2 (C - r)) per row."""
    HN = hz @ N
    return hz - HN @ N.T - N @ HN.mT + N @ (N.T @ HN) @ N.T


def _factor(matrix: torch.Tensor, problem: _Problem, gamma: torch.Tensor) -> torch.Tensor:
    """Cholesky factors; rows that are not positive definite get their penalty (gamma K^+ + Q, the
    identity times gamma in h) times 10^k added until they are."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    scale = 1.0
    while bool(info.any()):  # info > 0: not positive definite (it is never negative for a valid input)
        if scale > 1e30:
            raise SolverError("ufm: no positive definite Newton matrix even after a large shift")
        bad = torch.nonzero(info > 0).flatten()
        factor[bad], info[bad] = torch.linalg.cholesky_ex(matrix[bad] + scale * _penalty(problem, gamma[bad]))
        scale *= 10.0
    return factor


def _minimum_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The Cholesky factor of the (unshifted) Newton matrix at a stationary point: it exists where
    the point is a minimum; a saddle raises SolverError."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if bool((info > 0).any()):
        raise SolverError("ufm: the Newton iteration stopped at a saddle point of the objective")
    return factor


def _cholesky_solve(factor: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """(m, C) solutions of L L^T v = rhs: two triangular solves, several times faster on the CPU
    than torch.cholesky_solve for a batch of small systems with one right-hand side."""
    half = torch.linalg.solve_triangular(factor, rhs.unsqueeze(2), upper=False)
    return torch.linalg.solve_triangular(factor.mT, half, upper=True).squeeze(2)


def _line_search(problem: _Problem, gamma, half_gamma, targets, smoothed, x, f0, dx, gx):
    """(x, z, f, settled) after a step along the Newton directions dx from x, f(x) = f0; settled: the
    rows that took the full step with Newton's decrement below REUSE_DECREMENT (1 + |f|).

    A step is the full Newton step where it passes Armijo's test (doubled while that lowers f
    further, where f is far from its quadratic model: `_expand`); else the largest 2^-j that passes
    (`_backtrack`); or the full step where Newton's decrement -g.dx is below NEAR_DECREMENT (1 + |f|)
    and it halves the gradient.

    The last rule matters near the solution, where f changes by less than the rounding of its own
    evaluation (a logsumexp of logits of order 10 rounds at 1e-15): Armijo's test would reject every
    step there while Newton's full step still shrinks the gradient quadratically. Far from it, the
    gradient alone is no merit function: a step can halve it and climb f, and Newton could cycle.
    """
    slope = torch.linalg.vecdot(gx, dx)
    full = x + dx
    value, z = _objective_and_logits(problem, half_gamma, smoothed, full)
    magnitude = f0.abs()
    settled = torch.add(slope, magnitude, alpha=REUSE_DECREMENT) >= -REUSE_DECREMENT
    allowance = (ARMIJO_ULPS * EPS) * magnitude
    decrease = value - f0
    passed = decrease - allowance <= ARMIJO_SLOPE * slope
    near = torch.add(slope, magnitude, alpha=NEAR_DECREMENT) >= -NEAR_DECREMENT  # -slope <= NEAR (1 + |f|)
    grow = (decrease < (0.5 * EXPANSION_RATIO) * slope) & passed & ~near
    check = near & ~passed
    any_check, any_grow, any_failed = torch.stack([check, grow, ~(passed | near)]).any(dim=1).tolist()
    if any_check:
        rows = torch.nonzero(check).flatten()
        shrinks = (_x_gradient(problem, gamma[rows], targets[rows], full[rows]).norm(dim=1) <=
                   GRADIENT_DECREASE * gx[rows].norm(dim=1))
        passed[rows[shrinks]] = True
        any_failed = bool((~passed).any())
    if not (any_grow or any_failed):
        return full, z, value, settled  # the full Newton step everywhere: the common case
    step = torch.ones_like(f0)
    trial = _Trial(problem, gamma, smoothed, x, dx, f0, slope, allowance, step, value)
    _expand(trial, grow)
    _backtrack(trial, ~passed)
    x = torch.addcmul(x, step[:, None], dx)
    return x, problem.logits(x), value, settled & (step == 1.0)


@dataclass
class _Trial:
    """One line search: rows' points x, directions dx, f0 = f(x), slopes and Armijo allowances; the
    chosen steps and the objective there are updated in place."""
    problem: _Problem
    gamma: torch.Tensor
    smoothed: torch.Tensor
    x: torch.Tensor
    dx: torch.Tensor
    f0: torch.Tensor
    slope: torch.Tensor
    allowance: torch.Tensor
    step: torch.Tensor
    value: torch.Tensor

    def objective(self, rows, steps) -> torch.Tensor:
        return _row_objective(self.problem, self.gamma[rows], self.smoothed[rows],
                              torch.addcmul(self.x[rows], steps[:, None], self.dx[rows]))

    def armijo(self, rows, steps, values) -> torch.Tensor:
        return values <= self.f0[rows] + ARMIJO_SLOPE * steps * self.slope[rows] + self.allowance[rows]


def _expand(trial: _Trial, grow: torch.Tensor) -> None:
    """Doubles the accepted full step of the `grow` rows while f falls by more than its rounding.

    Far from the solution a softmax loss is far from its quadratic model: on the exponential tail
    of a nearly one-hot target, f ~ e^-margin, Newton's step raises the margin by about 1 where the
    optimum's margin is near 20 at the smallest gammas. Doubling reaches it in a few evaluations of f
    instead of a Newton step (and a factorisation) each. Where f is close to its model, f(2 dx) is
    about f(x) > f(x + dx) and the full step stays; every accepted step only lowers f further.
    """
    for _ in range(MAX_EXPANSIONS):
        if not bool(grow.any()):
            return
        rows = torch.nonzero(grow).flatten()
        steps = 2.0 * trial.step[rows]
        values = trial.objective(rows, steps)
        lower = (values < trial.value[rows] - trial.allowance[rows]) & trial.armijo(rows, steps, values)
        taken = rows[lower]
        trial.step[taken], trial.value[taken] = steps[lower], values[lower]
        grow[rows[~lower]] = False


def _backtrack(trial: _Trial, pending: torch.Tensor) -> None:
    """Halves the step of the `pending` rows until it passes Armijo's test."""
    for _ in range(MAX_BACKTRACKS):
        if not bool(pending.any()):
            return
        rows = torch.nonzero(pending).flatten()
        steps = 0.5 * trial.step[rows]
        values = trial.objective(rows, steps)
        trial.step[rows] = steps
        passed = trial.armijo(rows, steps, values)
        trial.value[rows[passed]] = values[passed]
        pending[rows[passed]] = False
    if bool(pending.any()):
        raise SolverError("ufm: the line search found no decrease (the Newton direction is not a descent direction)")


# ---------------------------------------------------------------- mae: a primal active-set method

def _mae(problem: _Problem, gamma: torch.Tensor, smoothed: torch.Tensor, start: Optional[torch.Tensor],
         tangents: bool = False):
    """(x (M, r), dx/dlog gamma (M, r) or None): mae's optimum for M rows, each with its own smoothed
    target and gamma, by the primal active-set method for the piecewise quadratic
    f(x) = |A x + beta|_1 + gamma |x|^2 / 2 (A = U S, beta = b - kappa t~).

    A piece is a set E of residuals held at zero and the signs s of the others. Its minimiser is
    x^ = -A^T u / gamma with u = s off E and, on E, the u_E that keep those residuals at zero:
    (A_E A_E^T) u_E = gamma beta_E - A_E A_N^T s_N. Each step moves from x towards x^ (f is that
    piece's convex quadratic there, so it decreases) and stops at the first residual that reaches
    zero, which joins E; or reaches x^, where the residual with |u_c| > 1 largest leaves E with the
    sign of u_c; or stops: |u_E| <= 1 is the subgradient condition gamma x + A^T u = 0 with u in the
    subdifferential of |.|_1, so x^ is the minimiser. One change of E per step, as in the simplex
    method: as many steps as logits change piece, a hundred or more from a cold start at C = 100.

    So it runs second: first, `_mae_pieces` jumps from piece minimiser to piece minimiser changing
    every wrong piece at once (a primal-dual active-set, or semismooth Newton, step: typically a
    few steps from anywhere), and returns the rows it certified with the same condition; the others
    continue here from the lowest point it visited, a few steps from their optimum.

    The tangent is that of the final piece, x(gamma) = -A^T u(gamma) / gamma:
    dx/dlog gamma = -x - A_E^T (A_E A_E^T)^-1 beta_E.
    """
    A = problem.US
    K = A @ A.T
    beta = problem.b - problem.kappa * smoothed
    scale = beta.abs().amax(dim=1, keepdim=True).clamp(min=1.0)
    x = torch.zeros(beta.shape[0], A.shape[1], dtype=torch.float64, device=A.device) if start is None else start.clone()
    x, todo = _mae_pieces(A, K, beta, gamma, scale, x)
    residual = torch.addmm(beta, x, A.T)
    held = residual.abs() <= ZERO_RTOL * scale
    signs = torch.where(held, 0.0, torch.sign(residual))
    for _ in range(MAX_ACTIVE_SET_STEPS):
        if not bool(todo.any()):
            if not tangents:
                return x, None
            on = held.double()
            return x, -x - (on * _restricted_solve(K, on, on * beta)) @ A
        rows = torch.nonzero(todo).flatten()
        on = held[rows].double()
        rhs = on * (gamma[rows, None] * beta[rows] - signs[rows] @ K)
        u = torch.addcmul(signs[rows], on, _restricted_solve(K, on, rhs))
        arrived = _advance(A, beta, gamma[rows, None], x, residual, held, signs, rows, -(u @ A) / gamma[rows, None])
        # at the piece's minimiser: a multiplier outside [-1, 1] leaves E, or it is optimal. Bland's rule
        # (the lowest such index, as the lowest blocking index joins in _advance) rules out cycling
        # through degenerate pieces, where a step of length zero changes E and not x.
        outside = held[rows] & (u.abs() > 1 + CERTIFICATE_RTOL)
        which = outside.to(torch.int8).argmax(dim=1)  # argmax returns the first maximal index
        optimal = arrived & ~outside.any(dim=1)
        release = arrived & ~optimal
        held[rows[release], which[release]] = False
        signs[rows[release], which[release]] = torch.sign(u[release, which[release]])
        todo[rows[optimal]] = False
    raise SolverError(f"ufm: mae optimum not found in {MAX_ACTIVE_SET_STEPS} active-set steps (gamma = "
                       f"{float(gamma.min()):.3g} to {float(gamma.max()):.3g}, {int(todo.sum())} targets left)")


def _mae_pieces(A, K, beta, gamma, scale, x):
    """(x (M, r), not certified (M,) bool): primal-dual active-set steps for mae from x.

    From the piece (E, s) of x (residuals at zero, signs of the others), each step goes to the piece
    minimiser x^ (see _mae) and changes every piece that x^ shows wrong at once: a residual off E
    that crossed zero joins E, a multiplier on E outside [-1, 1] leaves it with its sign (and so does
    a residual on E that x^ cannot hold at zero, where E has more logits than W has rank). A row
    whose x^ needs no change satisfies the subgradient condition (residuals on E zero to ZERO_RTOL,
    |u_E| <= 1 + CERTIFICATE_RTOL, every residual off E of the sign s assumed for it) and is
    certified. Unlike the active-set method
    this can cycle, so it stops after MAX_PIECE_STEPS: a row not certified by then gets the piece
    minimiser of lowest objective it visited (or x).
    """
    residual = torch.addmm(beta, x, A.T)
    held = residual.abs() <= ZERO_RTOL * scale
    signs = torch.where(held, 0.0, torch.sign(residual))
    best_x = x.clone()
    best_f = torch.addcmul(torch.linalg.vector_norm(residual, ord=1, dim=1), 0.5 * gamma, torch.linalg.vecdot(x, x))
    todo = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for _ in range(MAX_PIECE_STEPS):
        rows = torch.nonzero(todo).flatten()
        if rows.numel() == 0:
            break
        on, s, g = held[rows].double(), signs[rows], gamma[rows]
        u = torch.addcmul(s, on, _restricted_solve(K, on, on * (g[:, None] * beta[rows] - s @ K)))
        target = -(u @ A) / g[:, None]
        r = torch.addmm(beta[rows], target, A.T)
        # residuals on E are zero up to rounding, unless A_E has more rows than rank (E's system is then
        # solved in least squares): those leave E with their sign
        off_target = held[rows] & (r.abs() > ZERO_RTOL * scale[rows])
        leave = held[rows] & ((u.abs() > 1 + CERTIFICATE_RTOL) | off_target)
        join = (s * r) < 0
        value = torch.addcmul(torch.linalg.vector_norm(r, ord=1, dim=1), 0.5 * g, torch.linalg.vecdot(target, target))
        lower = value < best_f[rows]
        best_x[rows[lower]], best_f[rows[lower]] = target[lower], value[lower]
        certified = ~(leave | join).any(dim=1)
        best_x[rows[certified]] = target[certified]
        todo[rows[certified]] = False
        held[rows] = (held[rows] & ~leave) | join
        new_signs = torch.where(off_target, torch.sign(r), torch.where(leave, torch.sign(u), s))
        signs[rows] = torch.where(join, 0.0, new_signs)
    return best_x, todo


def _advance(A, beta, gamma, x, residual, held, signs, rows, target) -> torch.Tensor:
    """Move x[rows] towards the piece minimisers `target`, stopping where a residual off E first
    reaches zero (it joins E); updates x, residual, held, signs in place; (k,) True where the
    minimiser was reached. Residuals are measured along their sign s: one just released from E is
    zero up to rounding, of either sign."""
    step = target - x[rows]
    towards = signs[rows] * (step @ A.T)
    # a rate within rounding of zero is no crossing, nor is a step within rounding of none (see the constants)
    row_norms = torch.linalg.vector_norm(A, dim=1)
    length = torch.linalg.vector_norm(step, dim=1, keepdim=True)
    moves = length > NEGLIGIBLE_STEP_RTOL * row_norms.sum() / gamma  # (see NEGLIGIBLE_STEP_RTOL)
    crossing = (~held[rows]) & (towards < -DEGENERATE_RATE_RTOL * row_norms * length) & moves
    distance = (signs[rows] * residual[rows]).clamp(min=0.0)
    steps = torch.where(crossing, distance / torch.where(crossing, -towards, 1.0), math.inf)
    first = steps.min(dim=1).values
    # Bland's rule: of the residuals that reach zero first (to rounding), the lowest index joins E
    where = (steps <= first[:, None] * (1 + 4 * EPS)).to(torch.int8).argmax(dim=1)
    blocked = first < 1
    x[rows] = torch.addcmul(x[rows], torch.where(blocked, first, 1.0)[:, None], step)
    residual[rows] = torch.addmm(beta[rows], x[rows], A.T)
    joined = rows[blocked], where[blocked]
    held[joined], signs[joined], residual[joined] = True, 0.0, 0.0
    return ~blocked


def _restricted_solve(K, on, rhs) -> torch.Tensor:
    """(k, C) v with K_EE v_E = rhs_E on each row's set E (on: its (k, C) indicator) and v = rhs = 0
    off it (least squares where K_EE is singular). The system is K on E and the identity elsewhere,
    built in place: two passes over (k, C, C)."""
    matrix = K * on[:, :, None]
    matrix.mul_(on[:, None, :]).diagonal(dim1=1, dim2=2).add_(1.0 - on)
    factor, info = torch.linalg.cholesky_ex(matrix)
    regular = info == 0
    if bool(regular.all()):
        return _cholesky_solve(factor, rhs)
    solution = torch.empty_like(rhs)
    solution[regular] = _cholesky_solve(factor[regular], rhs[regular])
    solution[~regular] = (torch.linalg.pinv(matrix[~regular], hermitian=True) @ rhs[~regular, :, None])[:, :, 0]
    return solution


# ---------------------------------------------------------------- the fit

@dataclass
class _Data:
    """Learned features in the row-space coordinates, grouped by unique target."""
    Y: torch.Tensor        # (n, r) coordinates of P H
    inverse: torch.Tensor  # (n,) unique target of each row
    counts: torch.Tensor   # (m,) rows per unique target
    means: torch.Tensor    # (m, r) mean of Y over the rows of each unique target
    scatter: float         # sum of |Y_i - means[inverse_i]|^2: the residual no scale of H* can explain
    inside: float          # |P H|^2
    outside: float         # |(I - P) H|^2


def _data(problem: _Problem, H: torch.Tensor) -> _Data:
    """The data of the fit; H (n, d) float64 is overwritten with its part outside the row space
    ((n, d) temporaries cost more than the arithmetic here)."""
    Y = H @ problem.V.T
    counts = torch.bincount(problem.inverse, minlength=problem.targets.shape[0]).double()
    means = torch.zeros(counts.shape[0], Y.shape[1], dtype=Y.dtype, device=Y.device).index_add_(0, problem.inverse, Y)
    means /= counts[:, None]
    outside = H.addmm_(Y, problem.V, alpha=-1.0).view(-1)  # directly, not as a difference of large sums
    return _Data(Y, problem.inverse, counts, means, float((Y - means[problem.inverse]).square().sum()),
                 float(Y.square().sum()), float(outside @ outside))


class _Point(NamedTuple):
    """The optimum at one log gamma and how it fits the data."""
    x: torch.Tensor        # (m, r) optimum coordinates of the unique targets
    tangent: torch.Tensor  # (m, r) dx/dlog gamma (NaN where not computed)
    scale: float           # least-squares s >= 0
    residual: float        # |P H - s H*|^2
    slope: float           # d residual / d log gamma


def _points(data: _Data, solved: _Solved) -> list:
    """A _Point for each of k solutions x (k, m, r). Rows of one target share H*, so the residual is
    the within-target scatter plus sum_j count_j |mean_j - s x_j|^2: sums of squares, exact, without
    the cancellation of |Y|^2 - s <Y, H*>. Its slope is -2 s <P H - s H*, dH*/dlog gamma> (the
    derivative through s vanishes, s being optimal)."""
    x, tangent = solved.x, solved.tangent
    tangent = torch.full_like(x, math.nan) if tangent is None else tangent  # a point never refined from
    weighted = x * data.counts[:, None]
    norm = (weighted * x).sum(dim=(1, 2))
    inner = (weighted * data.means).sum(dim=(1, 2))
    scale = torch.where(norm > 0, inner.clamp(min=0.0) / torch.where(norm > 0, norm, 1.0), 0.0)
    difference = data.means - scale[:, None, None] * x
    misfit = difference * data.counts[:, None]  # count_j (mean_j - s x_j)
    residual = (misfit * difference).sum(dim=(1, 2)) + data.scatter
    slope = -2.0 * scale * (misfit * tangent).sum(dim=(1, 2))
    return [_Point(*values) for values in zip(x.unbind(0), tangent.unbind(0), scale.tolist(), residual.tolist(),
                                              slope.tolist())]


class _Solutions:
    """Optima along log gamma with their fit to the data: the grid in one batch, then single points."""

    def __init__(self, problem: _Problem, data: _Data):
        self.problem, self.data = problem, data
        self.points = {}  # log gamma -> _Point

    def solve_grid(self, grid) -> None:
        """All grid points in one batch from cold starts where the batch's (k m, C, C) matrices are
        small (BATCH_ELEMENTS); else one after the other from large gamma, each from the last
        solution (mae: its pieces; Newton: per target, the better of it, its tangent line and the
        cold starts): beyond a few MB per matrix batch, memory traffic costs more than calls save."""
        m, C = self.problem.targets.shape
        if len(grid) * m * C * C <= BATCH_ELEMENTS:
            self._add(grid, _solve(self.problem, self._gammas(grid), tangents=True))
            return
        previous = None
        for value in sorted(grid, reverse=True):
            starts = [] if previous is None else [self.points[previous].x[None]]
            if previous is not None and self.problem.loss_name in NEWTON_LOSSES:
                starts.append((self.points[previous].x + (value - previous) * self.points[previous].tangent)[None])
            self._add([value], _solve(self.problem, self._gammas([value]), starts, tangents=True))
            previous = value

    def solve_between(self, values, near: float, far: float, tangents: bool = True) -> None:
        """Points between two solved ones (one batch if small, as in solve_grid), from the solution at
        `near` (mae: its pieces) or, per target, the better of its tangent line and the cubic through
        both ends' values and tangents."""
        m, C = self.problem.targets.shape
        if len(values) > 1 and len(values) * m * C * C > BATCH_ELEMENTS:
            for value in values:
                self.solve_between([value], near, far, tangents)
            return
        first, second = self.points[near], self.points[far]
        starts = [first.x.expand(len(values), -1, -1)]
        if self.problem.loss_name in NEWTON_LOSSES:
            width = far - near
            # cubic Hermite basis and the tangent line, per point, on (x_near, w x'_near, x_far, w x'_far)
            basis = [[2 * t ** 3 - 3 * t ** 2 + 1, t ** 3 - 2 * t ** 2 + t, 3 * t ** 2 - 2 * t ** 3, t ** 3 - t ** 2]
                     for t in ((value - near) / width for value in values)]
            basis += [[1.0, (value - near) / width, 0.0, 0.0] for value in values]
            ends = torch.stack([first.x, width * first.tangent, second.x, width * second.tangent]).view(4, -1)
            predicted = (_gammas(basis, self.problem).view(-1, 4) @ ends).view(2, len(values), *first.x.shape)
            starts = list(predicted.unbind(0))
        self._add(values, _solve(self.problem, self._gammas(values), starts, cold=False, tangents=tangents))

    def best(self) -> float:
        return min(self.points, key=lambda key: (self.points[key].residual, -key))  # ties: the largest gamma

    def _gammas(self, values) -> torch.Tensor:
        return _gammas([math.exp(value) for value in values], self.problem)

    def _add(self, values, solved: _Solved) -> None:
        for value, point in zip(values, _points(self.data, solved)):
            self.points[float(value)] = point


def _search(solutions: _Solutions, log_low: float, log_high: float):
    """(log gamma of the best fit, residual spread over the grid, identifiable, at a bound)."""
    per_decade = MAE_GRID_PER_DECADE if solutions.problem.loss_name == "mae" else GRID_PER_DECADE
    count = int(round((log_high - log_low) / math.log(10.0) * per_decade)) + 1
    grid = [float(value) for value in np.linspace(log_low, log_high, count)]
    solutions.solve_grid(grid)
    residuals = [solutions.points[value].residual for value in grid]
    norm = math.sqrt(solutions.data.inside)
    spread = (math.sqrt(max(residuals)) - math.sqrt(min(residuals))) / norm
    if not _shape_varies(solutions, grid):
        # the largest gamma among equal residuals, as the sweep from large gamma found it
        return max(grid, key=lambda value: (-solutions.points[value].residual, value)), spread, False, False
    best = (_refine_kinked if solutions.problem.loss_name == "mae" else _refine)(solutions, grid)
    at_bound = min(abs(best - log_low), abs(best - log_high)) <= 2 * LOG_GAMMA_XATOL
    return best, spread, True, at_bound


def _refine_kinked(solutions: _Solutions, grid) -> float:
    """mae's refinement: bounded Brent (scipy) on the residual's values between the best grid point's
    neighbours, to KINKED_XATOL. mae's residual has kinks in log gamma wherever a logit changes
    piece, so slopes mislead a cubic step: on a planted case it stopped 0.04 short of the minimum
    (issue 20's rerun of the search test). Each value is one warm-started solve, from the nearest
    solved gamma's pieces; a bracket flat to rounding (mae's constant ranges) is not searched."""
    best = min(grid, key=lambda value: (solutions.points[value].residual, -value))  # ties: the largest gamma
    position = grid.index(best)
    low, high = grid[max(position - 1, 0)], grid[min(position + 1, len(grid) - 1)]
    rounding = FLAT_ULPS * EPS * solutions.data.inside
    ends = [solutions.points[value].residual for value in (low, best, high)]
    if max(ends) - min(ends) <= rounding:
        return best

    def residual(value) -> float:
        value = float(value)  # scipy passes numpy floats: the keys stay Python floats
        if value not in solutions.points:
            near = min(solutions.points, key=lambda solved: abs(solved - value))
            solutions.solve_between([value], near, near, tangents=False)
        return solutions.points[value].residual

    minimize_scalar(residual, bounds=(low, high), method="bounded", options={"xatol": KINKED_XATOL})
    return solutions.best()


def _refine(solutions: _Solutions, grid) -> float:
    """The log gamma of the least residual, to about LOG_GAMMA_XATOL, from the grid (ascending).

    The residual's slope at the best grid point b says on which side of it the minimum lies: that
    side, up to b's grid neighbour e, is solved at REFINE_FRACTIONS of the way in one batch. Then each step solves
    one point: the minimiser of the cubic through the residuals and slopes at the best point b and
    at e, the nearest point on the side where the residual falls, at most halfway to e. It stops
    where that cubic puts the minimum within LOG_GAMMA_XATOL of b, or e is that close, or at an end
    of the range where the residual still falls beyond it: 1 to 4 single solves after the split.
    """
    best = min(grid, key=lambda value: (solutions.points[value].residual, -value))  # ties: the largest gamma
    rounding = FLAT_ULPS * EPS * solutions.data.inside  # of residuals, sums of squares of terms up to |P H|
    for step in range(MAX_REFINE_STEPS):
        point = solutions.points[best]
        below, above = ([value for value in solutions.points if value < best],
                        [value for value in solutions.points if value > best])
        side = above if point.slope < 0 else below
        if not side:
            return best
        end = min(side) if point.slope < 0 else max(side)
        if abs(end - best) <= LOG_GAMMA_XATOL or abs(point.slope * (end - best)) <= rounding:
            return best  # bracketed closely enough, or flat within the residual's rounding (mae's flat ranges)
        if step == 0:
            solutions.solve_between([best + (end - best) * fraction for fraction in REFINE_FRACTIONS], best, end)
            best = solutions.best()
            continue
        offset = _cubic_step(point, solutions.points[end], end - best)
        if abs(offset) <= POLISH * LOG_GAMMA_XATOL:
            return best
        last = abs(offset) <= LOG_GAMMA_XATOL  # the cubic's minimum this close: its error is far smaller still
        solutions.solve_between([best + offset], best, end, tangents=not last)
        if last:
            return solutions.best()
        best = solutions.best()
    return best


def _cubic_step(start: _Point, end: _Point, width: float) -> float:
    """The offset from `start` (where the residual falls towards `end`, `width` away) of the minimum
    of the cubic through both residuals and slopes, at most width / 2 (where start's residual is the
    lower, a parabola's minimum is nearer start); the parabola through start's value and slope and
    end's value where the cubic has no minimum in between."""
    f0, f1 = start.residual, end.residual
    d0, d1 = start.slope * width, end.slope * width  # slopes in t = offset / width, d0 < 0
    a, b = d0 + d1 - 2 * (f1 - f0), 3 * (f1 - f0) - 2 * d0 - d1  # f(t) = f0 + d0 t + b t^2 + a t^3
    # f'(t) = 3 a t^2 + 2 b t + d0: its root where f'' > 0, written without cancellation
    discriminant = b * b - 3 * a * d0
    t = -d0 / (b + math.sqrt(discriminant)) if discriminant >= 0 and b + math.sqrt(discriminant) > 0 else math.inf
    if not 0 < t < 1:
        curvature = f1 - f0 - d0
        t = -d0 / (2 * curvature) if curvature > 0 else 0.5
    return min(t, 0.5) * width


def _shape_varies(solutions: _Solutions, grid) -> bool:
    """Whether H* / |H*| differs by more than SHAPE_RTOL between grid gammas."""
    x = torch.stack([solutions.points[value].x for value in grid]) * solutions.data.counts[:, None].sqrt()
    shapes = x / x.norm(dim=(1, 2), keepdim=True)  # the n rows, not the unique targets
    return bool(((shapes[1:] - shapes[0]).norm(dim=(1, 2)) > SHAPE_RTOL).any())


def _optimum_is_zero(solutions: _Solutions) -> bool:
    """Whether every solved optimum is h = 0 to rounding: relative to |A|_F max(1, |b - kappa t~|) /
    gamma, a bound on |x| for the losses' gradients, whose size is at most that of the target."""
    problem = solutions.problem
    size = float(problem.S.norm()) * max(1.0, float((problem.kappa * problem.smoothed - problem.b).abs().max()))
    return all(point.x.numel() == 0 or float(point.x.abs().amax()) <= ZERO_RTOL * size / math.exp(log_gamma)
               for log_gamma, point in solutions.points.items())


def _shape_residual(data: _Data, point: _Point) -> float:
    """sqrt(sum_j n_j |m_j - s x_j|^2 / sum_j n_j |m_j|^2): the fit's residual of the per-target means."""
    weights = data.counts[:, None]
    means_norm = float((weights * data.means.square()).sum())
    misfit = float((weights * (data.means - point.scale * point.x).square()).sum())
    return math.sqrt(misfit / means_norm) if means_norm > 0 else math.nan


def _group_residual(Y, fitted, mask) -> float:
    if not bool(mask.any()):
        return math.nan
    denominator = float(Y[mask].square().sum())
    return math.sqrt(float((Y[mask] - fitted[mask]).square().sum()) / denominator) if denominator > 0 else math.nan


def _same_class_mask(same_class, T: torch.Tensor) -> torch.Tensor:
    if same_class is None:
        return (T != 0).sum(dim=1) == 1
    mask = same_class if isinstance(same_class, torch.Tensor) else torch.from_numpy(np.asarray(same_class))
    mask = mask.to(device=T.device, dtype=torch.bool)
    if mask.shape != (T.shape[0],):
        raise ValueError(f"same_class must be ({T.shape[0]},), got {tuple(mask.shape)}")
    return mask


def unfitted_metrics(reason: str) -> dict:
    """The metrics of a fit that could not be made (e.g. after a SolverError), with the reason."""
    return _nan_metrics(reason, [math.nan, math.nan])


def _nan_metrics(reason: str, gamma_range) -> dict:
    return {"gamma": None, "scale": None, "identifiable": False, "gamma_at_bound": False,
            "residual": math.nan, "residual_same_class": math.nan, "residual_diff_class": math.nan,
            "scatter_floor": math.nan, "shape_residual": math.nan, "outside_share": math.nan, "residual_gamma_spread": math.nan, "curve_gamma": math.nan,
            "curve_scale": math.nan, "gamma_range": list(gamma_range), "nan_reason": reason}
