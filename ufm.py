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
- cross_entropy, focal, smooth_l1: Newton on the r coordinates, all unique targets at once, from h = 0
  or a warm start. The gradient is autograd's through `losses.build_loss` itself, so the stationary
  point is that of the run's loss whatever the Hessian. The Hessian H_z of l in the logits is written
  out (`_logit_curvature`: cross-entropy and focal by the chain rule through log-softmax, with focal's
  per-class term differentiated through losses' own focal; smooth_l1 diagonal), and the Newton system
  S U^T H_z U S + gamma I is solved in logit space as (P H_z P + gamma K^+ + Q) dz = -U S^-1 grad_x
  (K = W W^T, P and Q the projections onto U's columns and their complement): O(C^2) per point to
  assemble instead of O(C^2 r). Steps: Armijo backtracking, except that near the solution, where f
  changes by less than its own rounding, a full step that halves the gradient is taken.
  Stopping rule, per point: |grad_x f| <= STATIONARITY_RTOL gamma |x|, which bounds |x - x*| by
  1e-10 |x| where f is gamma-strongly convex; or, where that is below the rounding of the gradient
  itself, FLOOR_ULPS eps s_max (|grad_z l|_1 + k |t~|_1) (k = mse_scale for smooth_l1, else 1): this
  happens only at the smallest gammas for a nearly saturated softmax, where float64 fixes h* to
  about 1e-8. A point not converged in MAX_ITERATIONS steps raises RuntimeError, never a silent
  approximation.
- mae, not differentiable where a logit equals its target: the exact minimiser of the piecewise
  quadratic |A x + beta|_1 + gamma |x|^2 / 2 (A = U S, beta = b - kappa t~), by a primal active-set
  method (`_mae`): pieces are the sets E of logits held on their targets; each step moves to the
  next piece or to the current piece's minimiser, until its multipliers certify optimality. The
  solver returns the unique minimiser (the objective is gamma-strongly convex) exactly, up to the
  rounding of its linear algebra: h* = -W^T u / gamma with u in [-1, 1]^C (to CERTIFICATE_RTOL),
  u_c = sign(r_c) wherever the logit residual r = W h* + b - kappa t~ is non-zero, and r_c = 0
  (those logits sit exactly on their targets) where |u_c| < 1: the subgradient condition. u is the
  maximiser of the dual, max over [-1, 1]^C of u.(b - kappa t~) - |W^T u|^2 / (2 gamma). The number
  of steps grows with the number of logits on their targets (up to r): a cold start at a small
  gamma with C = 100 takes a hundred steps or more; the fit's sweep, warm-started, a few per gamma.

Convexity. mse, smooth_l1, mae and cross-entropy are convex in the logits, so the objective is
gamma-strongly convex in h and h* is unique. Focal (focal_gamma > 0) is not: its logit Hessian has
negative eigenvalues where the target class is strongly mispredicted (smallest found about -0.09 at
focal_gamma = 2, -0.23 at 5, one-hot or mixed targets, C = 5), so the objective is strongly convex
only when gamma exceeds s_max^2 times that magnitude. Otherwise the solver returns a local
minimiser: a point where the gradient vanishes to the tolerance and the Hessian is positive definite
(checked; a saddle raises RuntimeError), reached by steps that only descend from h = 0 or the warm
start (a Newton matrix that is not positive definite is shifted by multiples of gamma K^+, i.e. of
the identity in h). From h = 0 the iterates move towards predicting the target, away from the
region of negative curvature.

The fit. For learned features H (n, d) of mixup points with targets T, mu the global mean of the
training class means and P the projection onto the row space of W,

    min over s >= 0, gamma in the search range of  || P (H - mu) - s H*(gamma) ||_F

For each gamma the best s is the least-squares scale max(0, <P(H-mu), H*>) / |H*|^2 (a negative
multiple of the optimum is no agreement with it: s = 0, residual 1). log gamma is searched on a grid
of GRID_PER_DECADE points per decade, swept from large gamma to small so that each solve starts
from the previous ones, then refined by bounded Brent (scipy.optimize.minimize_scalar) between the
neighbours of the best grid point, to LOG_GAMMA_XATOL.

The gamma range is GAMMA_RANGE times s_max^2 (s_max the largest singular value of W): the optimum's
shape depends on gamma only through gamma / |W|^2 (scaling W by a acts as dividing gamma by a^2). At
the top, 1e4 s_max^2, the optimum moves the logits by at most 1e-4 |grad_z l| (|W h*| <= s_max^2
|grad_z l| / gamma): it is the linear response -W^T grad l(b) / gamma, whose shape no larger gamma
changes. At the bottom, 1e-8 s_max^2, cross-entropy's optimum for a one-hot target has logit margins
near 18 (C = 10) to 20 (C = 100) with a simplex-ETF classifier, beyond those of trained networks;
there its shape changes only logarithmically in gamma. A fitted gamma at (within 2 LOG_GAMMA_XATOL
of) either end is flagged `gamma_at_bound`: the data prefer a gamma outside the range.

Not identifiable. Where the shape of H* (H* up to a positive factor) is the same at every grid gamma
to SHAPE_RTOL, gamma and s are not identifiable, only s H* is: e.g. mse with a simplex-ETF classifier
and b = 0, where H* = W^T (kappa t~) / (C/(C-1) + gamma). The fit then reports gamma = s = None,
`identifiable` False, and the residuals of the common shape. `curve_gamma` and `curve_scale` are
always a (gamma, s) pair that reproduces the fitted s H* (the fitted pair when identifiable), for
`theory_curve`. mae's shape is moreover constant over whole ranges of gamma: below the gamma at which
every logit that can sit on its target does (with r = C: H* = W^+ (kappa t~ - b), interpolation), and
above the one at which none does. A fit that lands in such a range returns one gamma of it, with the
same residual as any other: there, gamma is only bounded, not determined.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from torch.func import vmap

from losses import LOSSES, build_loss, smooth_targets

LOSS_OPTIONS = ("label_smoothing", "mse_scale", "focal_gamma")
SOFTMAX_LOSSES = ("cross_entropy", "focal")
NEWTON_LOSSES = ("cross_entropy", "focal", "smooth_l1")
SMOOTH_L1_BETA = 1.0  # losses.smooth_l1's beta: its curvature is 1 where |z - kappa t~| < beta
STATIONARITY_RTOL = 1e-10
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
GAMMA_RANGE = (1e-8, 1e4)  # in units of s_max^2, see the module docstring
GRID_PER_DECADE = 0.5    # a grid point every two decades: the shape changes slowly in log gamma
LOG_GAMMA_XATOL = 1e-2     # natural log: gamma to about 1 %
SHAPE_RTOL = 1e-8
# mae: residuals below ZERO_RTOL max(1, |b - kappa t~|) count as zero at a warm start; multipliers
# up to 1 + CERTIFICATE_RTOL count as inside [-1, 1].
ZERO_RTOL = 1e-12
CERTIFICATE_RTOL = 1e-10
MAX_ACTIVE_SET_STEPS = 2000  # one change of E per step: far above the pieces C <= a few hundred visit


class UFMFit(NamedTuple):
    metrics: dict        # plain Python values, see `fit`
    H_fit: torch.Tensor  # (n, d) float64: s H*(gamma) at the fitted gamma, rows as H


def _with_autograd(function):
    """Run with autograd on, even under torch.inference_mode (the feature capture runs in it)."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False), torch.enable_grad():
            return function(*args, **kwargs)
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
    return problem.features(_solve(problem, gamma)[0])


def newton_features(W, b, T, loss_name: str, gamma: float, **loss_options) -> torch.Tensor:
    """`optimal_features` through the Newton solver for any differentiable loss, mse included:
    the generic path, exposed so that it can be checked against mse's closed form."""
    _check_gamma(gamma)
    if loss_name == "mae":
        raise ValueError("mae is not differentiable: its optimum comes from the active-set method, not Newton")
    problem = _problem(W, b, T, loss_name, loss_options)
    return problem.features(_newton(problem, gamma, None))


def theory_curve(W, b, pair: Sequence[int], lambdas, loss_name: str, gamma: float, scale: float,
                 **loss_options) -> torch.Tensor:
    """(len(lambdas), d) float64: scale * h*(lam e_a + (1 - lam) e_b) for pair = (a, b), every lam.

    With a fit's `curve_gamma` and `curve_scale`: the theory's curve of one pair type, to draw
    through the learned points. It models P (H - mu): project it as the centred features are,
    without subtracting mu again.
    """
    W = _as_float64(W)
    lam = _as_float64(lambdas, W.device).reshape(-1, 1)
    eye = torch.eye(W.shape[0], dtype=torch.float64, device=W.device)
    first, second = (int(c) for c in pair)
    return scale * optimal_features(W, b, lam * eye[first] + (1 - lam) * eye[second], loss_name, gamma,
                                     **loss_options)


def fit(H, T, W, b, loss_name: str, mu, *, same_class=None, gamma_range: Tuple[float, float] = GAMMA_RANGE,
        **loss_options) -> UFMFit:
    """The s >= 0 and gamma for which s H*(gamma) best matches P (H - mu) (see the module docstring).

    H (n, d) learned features of mixup points with raw targets T (n, C); W (C, d), b (C,) or None
    the classifier; mu (d,) the global mean of the training class means. `same_class` (n,) bool
    marks the same-class points; by default the rows whose target has a single non-zero entry (so
    different-class pairs at lam = 0 or 1, whose inputs are clean images, count as same-class).
    `gamma_range` is in units of s_max^2, the largest squared singular value of W.

    Returns UFMFit(metrics, H_fit); H_fit is the (n, d) float64 tensor s H* at the fitted gamma,
    and metrics holds plain Python values:
      gamma, scale            the fit; None when not identifiable
      identifiable            False when the shape of H* is the same at every searched gamma
      gamma_at_bound          the fitted gamma is an end of the search range
      residual, residual_same_class, residual_diff_class
                              |P(H-mu) - s H*|_F / |P(H-mu)|_F over all / same- / different-class
                              rows (NaN for an empty group)
      outside_share           |(I-P)(H-mu)|^2 / |H-mu|^2
      residual_gamma_spread   largest minus smallest residual over the gamma grid: how much gamma matters
      curve_gamma, curve_scale  a (gamma, s) that reproduces H_fit, for `theory_curve`
      gamma_range             [low, high] searched, absolute
      nan_reason              None, or why the numbers are NaN and gamma None (non-finite input,
                              features without a component in the row space); H_fit is NaN then
    """
    _check_loss(loss_name, loss_options)
    W64, b64, T64 = _classifier(W, b, T)
    H64, mu64 = _as_float64(H, W64.device), _as_float64(mu, W64.device)
    if H64.dim() != 2 or H64.shape != (T64.shape[0], W64.shape[1]) or mu64.shape != (W64.shape[1],):
        raise ValueError(f"H must be (n, d) = ({T64.shape[0]}, {W64.shape[1]}) and mu (d,), got "
                         f"{tuple(H64.shape)} and {tuple(mu64.shape)}")
    low, high = (float(v) for v in gamma_range)
    if not (0 < low < high and math.isfinite(high)):
        raise ValueError(f"gamma_range must be 0 < low < high < inf, got {gamma_range}")
    same = _same_class_mask(same_class, T64)
    nan_fit = torch.full_like(H64, math.nan)
    for name, tensor in (("H", H64), ("mu", mu64), ("W", W64), ("b", b64), ("T", T64)):
        if not bool(torch.isfinite(tensor).all()):
            return UFMFit(_nan_metrics(f"{name} is not finite", [math.nan, math.nan]), nan_fit)

    problem = _problem(W64, b64, T64, loss_name, loss_options)
    absolute = [low * float(problem.S[0]) ** 2, high * float(problem.S[0]) ** 2]
    data = _data(problem, H64, mu64)
    if data.inside == 0.0:
        return UFMFit(_nan_metrics("the features have no component in the row space of W", absolute), nan_fit)
    path = _Path(problem, data)
    log_gamma, spread, varies, at_bound = _search(path, math.log(absolute[0]), math.log(absolute[1]))
    x, _, scale, _ = path.at(log_gamma)
    fitted = scale * x[problem.inverse]
    everything = torch.ones_like(same)
    metrics = {
        "gamma": math.exp(log_gamma) if varies else None,
        "scale": scale if varies else None,
        "identifiable": varies,
        "gamma_at_bound": varies and at_bound,
        "residual": _group_residual(data.Y, fitted, everything),
        "residual_same_class": _group_residual(data.Y, fitted, same),
        "residual_diff_class": _group_residual(data.Y, fitted, ~same),
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
    targets: torch.Tensor    # (m, C) unique raw target rows
    smoothed: torch.Tensor   # (m, C) the same rows after label smoothing
    inverse: torch.Tensor    # (n,) row of `targets` of each input row
    b: torch.Tensor          # (C,)
    V: torch.Tensor          # (r, d) orthonormal basis of the row space of W
    U: torch.Tensor          # (C, r)
    S: torch.Tensor          # (r,) singular values, largest first
    N: torch.Tensor          # (C, C - r) orthonormal basis of the complement of U's columns

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.b + (x * self.S) @ self.U.T

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
    if not all(bool(torch.isfinite(tensor).all()) for tensor in (W, b, T)):
        raise ValueError("W, b and T must be finite")
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    if not S.numel() or S[0] == 0:
        raise ValueError("W is zero: the optimum is h = 0 for every target")
    rank = int((S > RANK_RTOL * S[0]).sum())
    complete, _ = torch.linalg.qr(U[:, :rank], mode="complete")
    targets, inverse = torch.unique(T, dim=0, return_inverse=True)
    unsmoothed = {key: value for key, value in loss_options.items() if key != "label_smoothing"}
    return _Problem(
        loss_name, build_loss(loss_name, **loss_options), build_loss(loss_name, **unsmoothed),
        float(loss_options.get("mse_scale", 1.0)), targets,
        smooth_targets(targets, loss_options.get("label_smoothing", 0.0)), inverse, b,
        Vh[:rank], U[:, :rank], S[:rank], complete[:, rank:])


def _solve(problem: _Problem, gamma: float, start=None):
    """(x (m, r) coordinates of the optimum, the state to warm-start another gamma from)."""
    if problem.loss_name == "mse":
        S = problem.S
        return (problem.kappa * problem.smoothed - problem.b) @ problem.U * (S / (S.square() + gamma)), None
    if problem.loss_name == "mae":
        x = _mae(problem, gamma, start)
        return x, x
    x = _newton(problem, gamma, start)
    return x, x


# ---------------------------------------------------------------- the smooth losses: Newton

def _newton(problem: _Problem, gamma: float, start: Optional[torch.Tensor]) -> torch.Tensor:
    """(m, r) optimum coordinates of a differentiable loss; see the module docstring."""
    x = torch.zeros(problem.targets.shape[0], problem.S.shape[0], dtype=torch.float64,
                    device=problem.S.device) if start is None else start.clone()
    todo = torch.arange(x.shape[0], device=x.device)
    penalty = _penalty(problem, gamma)
    for _ in range(MAX_ITERATIONS):
        t, ts, xa = problem.targets[todo], problem.smoothed[todo], x[todo]
        z = problem.logits(xa)
        gz = _gradient(problem, z, t)[0].detach()
        gx = (gz @ problem.U) * problem.S + gamma * xa  # as _x_gradient, keeping gz for the floor
        done = gx.norm(dim=1) <= torch.maximum(STATIONARITY_RTOL * gamma * xa.norm(dim=1), _floor(problem, gz, ts))
        if problem.loss_name == "focal" and bool(done.any()):  # the one loss that is not convex
            _check_minimum(_newton_matrix(problem, penalty, z[done], ts[done]))
        keep = ~done
        todo, t, ts, xa, z, gx = todo[keep], t[keep], ts[keep], xa[keep], z[keep], gx[keep]
        if todo.numel() == 0:
            return x
        factor = _factor(_newton_matrix(problem, penalty, z, ts), penalty)
        dz = -_cholesky_solve(factor, (gx / problem.S) @ problem.U.T)
        dx = (dz @ problem.U) / problem.S
        x[todo] = xa + _line_search(problem, gamma, t, xa, dx, gx) * dx
    raise RuntimeError(f"ufm: {problem.loss_name} optimum not converged in {MAX_ITERATIONS} Newton steps "
                       f"(gamma = {gamma:.3g}, {len(todo)} targets left)")


def _values(problem: _Problem, z, t) -> torch.Tensor:
    """(m,) per-row losses: the batch-mean loss of a batch of one, vmapped over the rows."""
    return vmap(lambda row, target: problem.loss(row[None], target[None]))(z, t)


def _objective(problem: _Problem, gamma: float, t, x) -> torch.Tensor:
    return _values(problem, problem.logits(x), t) + 0.5 * gamma * x.square().sum(dim=1)


def _gradient(problem: _Problem, z, t, create_graph: bool = False):
    """(m, C) per-row gradients of the loss in the logits, and the leaf they were taken at.

    autograd through the loss itself: rows are independent, so the per-row gradients are those of
    m times the batch mean. torch.autograd rather than torch.func, whose first call costs seconds.
    """
    leaf = z.detach().requires_grad_()
    gradient, = torch.autograd.grad(problem.loss(leaf, t) * z.shape[0], leaf, create_graph=create_graph)
    return gradient, leaf


def _x_gradient(problem: _Problem, gamma: float, t, x) -> torch.Tensor:
    """(m, r) gradient of the objective in the row-space coordinates: S U^T grad_z l + gamma x."""
    return (_gradient(problem, problem.logits(x), t)[0].detach() @ problem.U) * problem.S + gamma * x


def _floor(problem: _Problem, gradient_z: torch.Tensor, t_smooth: torch.Tensor) -> torch.Tensor:
    """Per-row rounding level of |grad_x f|: below it the stationarity test cannot be certified."""
    kappa = 1.0 if problem.loss_name in SOFTMAX_LOSSES else problem.kappa
    magnitude = gradient_z.abs().sum(dim=1) + kappa * t_smooth.abs().sum(dim=1)
    return FLOOR_ULPS * torch.finfo(torch.float64).eps * problem.S[0] * magnitude


def _penalty(problem: _Problem, gamma: float) -> torch.Tensor:
    """(C, C) gamma K^+ + Q: the penalty's Hessian in the logits, plus a unit block on the
    complement of U's columns (any positive block: the right-hand side has no component there)."""
    U, S, N = problem.U, problem.S, problem.N
    return gamma * (U / S.square()) @ U.T + N @ N.T


def _newton_matrix(problem: _Problem, penalty: torch.Tensor, z, t_smooth) -> torch.Tensor:
    """(m, C, C) P H_z P + gamma K^+ + Q: the x-space Hessian S U^T H_z U S + gamma I in logit space.
    H_z = diag(d) - L R^T with L, R of rank <= 2, so that where N is empty it costs O(C^2) per row."""
    diagonal, left, right = _logit_curvature(problem, z, t_smooth)
    if problem.N.shape[1]:
        hz = torch.diag_embed(diagonal) - (left @ right.mT if left is not None else 0.0)
        return _project(hz, problem.N) + penalty
    batch = penalty.expand(z.shape[0], -1, -1)
    matrix = batch.clone() if left is None else torch.baddbmm(batch, left, right.mT, alpha=-1.0)
    matrix.diagonal(dim1=1, dim2=2).add_(diagonal)
    return matrix


def _logit_curvature(problem: _Problem, z, t_smooth):
    """H_z = diag(d) - L R^T as (d (m, C), L (m, C, 2) or None, R (m, C, 2) or None).

    mse: 1. smooth_l1 (Huber): 1 where |z - kappa t~| < beta, else 0. The softmax losses are
    l = sum_c t~_c phi(q_c), q = log softmax(z); with a = t~ phi'(q), b = t~ phi''(q), A = sum a,
    B = sum b, the chain rule gives H_z = diag(b - A p) - b p^T - p b^T + (A + B) p p^T, that is
    L = [c, p], R = [p, c] with c = b - (A + B) p / 2. Cross-entropy: phi(q) = -q.
    """
    name = problem.loss_name
    if name == "mse":
        return torch.ones_like(z), None, None
    if name == "smooth_l1":
        return ((z - problem.kappa * t_smooth).abs() < SMOOTH_L1_BETA).double(), None, None
    p = torch.softmax(z, dim=1)
    if name == "cross_entropy":
        a, b = -t_smooth, torch.zeros_like(z)
    else:
        first, second = _class_term_derivatives(problem, torch.log_softmax(z, dim=1))
        a, b = t_smooth * first, t_smooth * second
    A, B = a.sum(dim=1, keepdim=True), b.sum(dim=1, keepdim=True)
    c = b - 0.5 * (A + B) * p
    return b - A * p, torch.stack([c, p], dim=2), torch.stack([p, c], dim=2)


def _class_term_derivatives(problem: _Problem, q: torch.Tensor):
    """phi'(q), phi''(q) of focal's per-class term (focal is sum_c t_c phi(log p_c)), evaluated
    through losses' focal itself: on the two logits (q, log(1 - e^q)), whose log-softmax is exactly
    themselves, the loss of target e_0 is phi(q). q stays below 0 by a hair, so that the second logit
    is finite where p rounds to 1."""
    leaf = q.detach().clamp(max=-torch.finfo(torch.float64).tiny).reshape(-1).requires_grad_()
    pair = torch.stack([leaf, torch.log(-torch.expm1(leaf))], dim=1)
    first_class = torch.zeros_like(pair)
    first_class[:, 0] = 1.0
    total = problem.unsmoothed_loss(pair, first_class) * pair.shape[0]  # the sum of phi over the entries
    first, = torch.autograd.grad(total, leaf, create_graph=True)
    second, = torch.autograd.grad(first.sum(), leaf)  # phi acts entry by entry: its Hessian is diagonal
    return first.detach().view_as(q), second.view_as(q)


def _project(hz: torch.Tensor, N: torch.Tensor) -> torch.Tensor:
    """P H P with P = I - N N^T, in O(C^2 (C - r)) per row."""
    HN = hz @ N
    return hz - HN @ N.T - N @ HN.mT + N @ (N.T @ HN) @ N.T


def _factor(matrix: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Cholesky factors; rows that are not positive definite get shift * 10^k added until they are."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    scale = 1.0
    while bool((info > 0).any()):
        if scale > 1e30:
            raise RuntimeError("ufm: no positive definite Newton matrix even after a large shift")
        bad = torch.nonzero(info > 0).flatten()
        factor[bad], info[bad] = torch.linalg.cholesky_ex(matrix[bad] + scale * shift)
        scale *= 10.0
    return factor


def _check_minimum(matrix: torch.Tensor) -> None:
    """A stationary point is a minimum where the (unshifted) Newton matrix is positive definite."""
    if bool((torch.linalg.cholesky_ex(matrix)[1] > 0).any()):
        raise RuntimeError("ufm: the Newton iteration stopped at a saddle point of the objective")


def _cholesky_solve(factor: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """(m, C) solutions of L L^T v = rhs: two triangular solves, several times faster on the CPU
    than torch.cholesky_solve for a batch of small systems with one right-hand side."""
    half = torch.linalg.solve_triangular(factor, rhs[:, :, None], upper=False)
    return torch.linalg.solve_triangular(factor.mT, half, upper=True)[:, :, 0]


def _line_search(problem: _Problem, gamma: float, t, x, dx, gx) -> torch.Tensor:
    """(k, 1) step lengths: the largest 2^-j that passes Armijo's test; or the full Newton step
    where Newton's decrement -g.dx is below NEAR_DECREMENT (1 + |f|) and the step halves the gradient.

    The second rule matters near the solution, where f changes by less than the rounding of its own
    evaluation (a logsumexp of logits of order 10 rounds at 1e-15): Armijo's test would reject every
    step there while Newton's full step still shrinks the gradient quadratically. Far from it, the
    gradient alone is no merit function: a step can halve it and climb f, and Newton could cycle.
    """
    f0 = _objective(problem, gamma, t, x)
    slope = (gx * dx).sum(dim=1)
    allowance = ARMIJO_ULPS * torch.finfo(torch.float64).eps * f0.abs()
    full = x + dx
    near = (-slope <= NEAR_DECREMENT * (1 + f0.abs())) & (
        _x_gradient(problem, gamma, t, full).norm(dim=1) <= GRADIENT_DECREASE * gx.norm(dim=1))
    pending = ~(near | (_objective(problem, gamma, t, full) <= f0 + ARMIJO_SLOPE * slope + allowance))
    step = torch.ones_like(f0)
    for _ in range(MAX_BACKTRACKS):
        if not bool(pending.any()):
            return step[:, None]
        rows = torch.nonzero(pending).flatten()
        step[rows] *= 0.5
        trial = _objective(problem, gamma, t[rows], x[rows] + step[rows, None] * dx[rows])
        pending[rows[trial <= f0[rows] + ARMIJO_SLOPE * step[rows] * slope[rows] + allowance[rows]]] = False
    raise RuntimeError("ufm: the line search found no decrease (the Newton direction is not a descent direction)")


# ---------------------------------------------------------------- mae: a primal active-set method

def _mae(problem: _Problem, gamma: float, start: Optional[torch.Tensor]) -> torch.Tensor:
    """(m, r) coordinates of mae's optimum, by the primal active-set method for the piecewise
    quadratic f(x) = |A x + beta|_1 + gamma |x|^2 / 2 (A = U S, beta = b - kappa t~).

    A piece is a set E of residuals held at zero and the signs s of the others. Its minimiser is
    x^ = -A^T u / gamma with u = s off E and, on E, the u_E that keep those residuals at zero:
    (A_E A_E^T) u_E = gamma beta_E - A_E A_N^T s_N. Each step moves from x towards x^ (f is that
    piece's convex quadratic there, so it decreases) and stops at the first residual that reaches
    zero, which joins E; or reaches x^, where the residual with |u_c| > 1 largest leaves E with the
    sign of u_c; or stops: |u_E| <= 1 is the subgradient condition gamma x + A^T u = 0 with u in the
    subdifferential of |.|_1, so x^ is the minimiser. One change of E per step, as in the simplex
    method; from a neighbouring gamma's solution (the fit's sweep) only a few.
    """
    A = problem.U * problem.S
    K = A @ A.T
    beta = problem.b - problem.kappa * problem.smoothed
    scale = beta.abs().amax(dim=1, keepdim=True).clamp(min=1.0)
    x = torch.zeros(beta.shape[0], A.shape[1], dtype=torch.float64, device=A.device) if start is None else start.clone()
    residual = x @ A.T + beta
    held = residual.abs() <= ZERO_RTOL * scale
    signs = torch.where(held, 0.0, torch.sign(residual))
    todo = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for _ in range(MAX_ACTIVE_SET_STEPS):
        rows = torch.nonzero(todo).flatten()
        u = _piece_multipliers(K, beta[rows], gamma, held[rows], signs[rows])
        arrived = _advance(A, beta, x, residual, held, signs, rows, -(u @ A) / gamma)
        # at the piece's minimiser: the multiplier furthest outside [-1, 1] leaves E, or it is optimal
        worst, which = torch.where(held[rows], u.abs(), 0.0).max(dim=1)
        optimal = arrived & (worst <= 1 + CERTIFICATE_RTOL)
        release = arrived & ~optimal
        held[rows[release], which[release]] = False
        signs[rows[release], which[release]] = torch.sign(u[release, which[release]])
        todo[rows[optimal]] = False
        if not bool(todo.any()):
            return x
    raise RuntimeError(f"ufm: mae optimum not found in {MAX_ACTIVE_SET_STEPS} active-set steps (gamma = {gamma:.3g}, "
                       f"{int(todo.sum())} targets left)")


def _advance(A, beta, x, residual, held, signs, rows, target) -> torch.Tensor:
    """Move x[rows] towards the piece minimisers `target`, stopping where a residual off E first
    reaches zero (it joins E); updates x, residual, held, signs in place; (k,) True where the
    minimiser was reached. Residuals are measured along their sign s: one just released from E is
    zero up to rounding, of either sign."""
    step = target - x[rows]
    towards = signs[rows] * (step @ A.T)
    crossing = (~held[rows]) & (towards < 0)
    distance = (signs[rows] * residual[rows]).clamp(min=0.0)
    first, where = torch.where(crossing, distance / torch.where(crossing, -towards, 1.0), math.inf).min(dim=1)
    blocked = first < 1
    x[rows] = x[rows] + torch.where(blocked, first, 1.0)[:, None] * step
    residual[rows] = x[rows] @ A.T + beta[rows]
    joined = rows[blocked], where[blocked]
    held[joined], signs[joined], residual[joined] = True, 0.0, 0.0
    return ~blocked


def _piece_multipliers(K, beta, gamma: float, held, signs) -> torch.Tensor:
    """(k, C) u: s off E and the u_E of the piece on E (least squares where A_E is rank deficient)."""
    on = held.double()
    matrix = K * on[:, :, None] * on[:, None, :] + torch.diag_embed(1.0 - on)
    rhs = on * (gamma * beta - signs @ K)
    factor, info = torch.linalg.cholesky_ex(matrix)
    solution = torch.empty_like(rhs)
    regular = info == 0
    solution[regular] = _cholesky_solve(factor[regular], rhs[regular])
    if not bool(regular.all()):
        solution[~regular] = (torch.linalg.pinv(matrix[~regular], hermitian=True) @ rhs[~regular, :, None])[:, :, 0]
    return signs + on * solution


# ---------------------------------------------------------------- the fit

@dataclass
class _Data:
    """Learned features in the row-space coordinates."""
    Y: torch.Tensor        # (n, r) coordinates of P (H - mu)
    inverse: torch.Tensor  # (n,) unique target of each row
    counts: torch.Tensor   # (m,) rows per unique target
    inside: float          # |P (H - mu)|^2
    outside: float         # |(I - P)(H - mu)|^2


def _data(problem: _Problem, H: torch.Tensor, mu: torch.Tensor) -> _Data:
    centred = H - mu
    Y = centred @ problem.V.T
    counts = torch.bincount(problem.inverse, minlength=problem.targets.shape[0]).double()
    outside = float((centred - Y @ problem.V).square().sum())  # directly, not as a difference of large sums
    return _Data(Y, problem.inverse, counts, float(Y.square().sum()), outside)


def _scale_and_residual(data: _Data, x: torch.Tensor) -> Tuple[float, float]:
    """The least-squares s >= 0 of s H* and the squared residual |P(H-mu) - s H*|^2 it leaves,
    summed row by row (|Y|^2 - s <Y, H*> would lose small residuals to cancellation)."""
    rows = x[data.inverse]
    norm = float(rows.square().sum())
    scale = max(float((data.Y * rows).sum()), 0.0) / norm if norm > 0 else 0.0
    return scale, float((data.Y - scale * rows).square().sum())


class _Path:
    """Solves along log gamma, each warm-started from the solutions at the gammas nearest to it."""

    def __init__(self, problem: _Problem, data: _Data):
        self.problem, self.data = problem, data
        self.solved = {}  # log gamma -> (x, state, scale, residual^2)

    def at(self, log_gamma: float):
        if log_gamma not in self.solved:
            x, state = _solve(self.problem, math.exp(log_gamma), self._start(log_gamma))
            self.solved[log_gamma] = (x, state, *_scale_and_residual(self.data, x))
        return self.solved[log_gamma]

    def residual(self, log_gamma: float) -> float:
        return self.at(log_gamma)[3]

    def _start(self, log_gamma: float):
        """The nearest solution or, per point, the straight line in log gamma through the two nearest,
        whichever has the lower objective: once the softmax saturates, a Newton loss's solutions move
        almost linearly in log gamma."""
        nearest = sorted(self.solved, key=lambda key: abs(key - log_gamma))[:2]
        if not nearest:
            return None
        start = self.solved[nearest[0]][1]
        if len(nearest) < 2 or self.problem.loss_name not in NEWTON_LOSSES:
            return start
        (k0, s0), (k1, s1) = ((key, self.solved[key][1]) for key in nearest)
        line = s0 + (log_gamma - k0) / (k1 - k0) * (s1 - s0)
        gamma, targets = math.exp(log_gamma), self.problem.targets
        better = _objective(self.problem, gamma, targets, line) < _objective(self.problem, gamma, targets, start)
        return torch.where(better[:, None], line, start)


def _search(path: _Path, log_low: float, log_high: float):
    """(log gamma of the best fit, residual spread over the grid, identifiable, at a bound)."""
    count = int(round((log_high - log_low) / math.log(10.0) * GRID_PER_DECADE)) + 1
    grid = np.linspace(log_high, log_low, count)  # large gamma first: the sweep warm-starts downwards
    residuals = [path.residual(float(g)) for g in grid]
    norm = math.sqrt(path.data.inside)
    spread = (math.sqrt(max(residuals)) - math.sqrt(min(residuals))) / norm
    best = int(np.argmin(residuals))
    if not _shape_varies(path, grid):
        return float(grid[best]), spread, False, False
    low, high = float(grid[min(best + 1, count - 1)]), float(grid[max(best - 1, 0)])
    refined = float(minimize_scalar(path.residual, bounds=(low, high), method="bounded",
                                    options={"xatol": LOG_GAMMA_XATOL}).x)
    choice = refined if path.residual(refined) <= residuals[best] else float(grid[best])
    at_bound = min(abs(choice - log_low), abs(choice - log_high)) <= 2 * LOG_GAMMA_XATOL
    return choice, spread, True, at_bound


def _shape_varies(path: _Path, grid) -> bool:
    """Whether H* / |H*| differs by more than SHAPE_RTOL between grid gammas."""
    weight = path.data.counts[:, None].sqrt()  # the n rows, not the unique targets
    shapes = []
    for g in grid:
        x = path.at(float(g))[0] * weight
        shapes.append(x / x.norm())
    return any(float((shape - shapes[0]).norm()) > SHAPE_RTOL for shape in shapes[1:])


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


def _nan_metrics(reason: str, gamma_range) -> dict:
    return {"gamma": None, "scale": None, "identifiable": False, "gamma_at_bound": False,
            "residual": math.nan, "residual_same_class": math.nan, "residual_diff_class": math.nan,
            "outside_share": math.nan, "residual_gamma_spread": math.nan, "curve_gamma": math.nan,
            "curve_scale": math.nan, "gamma_range": list(gamma_range), "nan_reason": reason}
