"""Newton for the differentiable losses (cross_entropy, focal, smooth_l1; mse too, through
`ufm.newton_features`): the optimum's r coordinates for a batch of rows that are independent
problems, all unique targets and, in the fit, all the gammas of a search level at once (each row has
its own gamma).

Each row starts from the lowest objective among its candidates: a neighbouring gamma's solution and
its tangent line or cubic interpolation in log gamma, or cold starts (h = 0 and closed-form guesses,
`_cold_starts`). The gradient is autograd's through `losses.build_loss` itself, so the stationary
point is that of the run's loss whatever the Hessian and whatever the starts. The Hessian H_z of l in
the logits is written out (ufm/objective.py), and the Newton system S U^T H_z U S + gamma I is solved
in logit space as (P H_z P + gamma K^+ + Q) dz = -U S^-1 grad_x (K = W W^T, P and Q the projections
onto U's columns and their complement): O(C^2) per point to assemble instead of O(C^2 r).

Steps: Armijo backtracking; a full step that lowers f by more than its quadratic model predicts is
doubled while f keeps falling (on a softmax's exponential tail Newton's step is far too short); near
the solution, where f changes by less than its own rounding, a full step that halves the gradient is
taken. The line search compares per-row values of the loss written out (`objective._row_losses`,
checked against build_loss's batch mean): it picks steps, never the answer. Where
C >= REUSE_MIN_CLASSES (factorisations dominate), a row in Newton's quadratic phase reuses its last
factorisation.

Stopping rule, per point: |grad_x f| <= STATIONARITY_RTOL gamma |x|, which bounds |x - x*| by
1e-10 |x| where f is gamma-strongly convex; or, where that is below the rounding of the gradient
itself, FLOOR_ULPS eps s_max (|grad_z l|_1 + k |t~|_1) (k = mse_scale for smooth_l1, else 1): this
happens only at the smallest gammas for a nearly saturated softmax, where float64 fixes h* to about
1e-8. A point not converged in MAX_ITERATIONS steps raises SolverError, never a silent
approximation. Focal, which is not convex, is checked to stop at a minimum (ufm/optimum.py,
"Convexity").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ufm.objective import (_check_row_losses, _gradient, _newton_matrix, _objective_and_logits, _penalty,
                           _row_losses, _row_objective, _x_gradient)
from ufm.problem import EPS, SOFTMAX_LOSSES, SolverError, _Problem, _cholesky_solve

STATIONARITY_RTOL = 1e-10
# The gradient's rounding level, in ulps of the magnitudes it is a difference of.
FLOOR_ULPS = 64.0
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
# Cold starts of the softmax losses: the least-squares logits log(t~ + c gamma / s_max^2), for each c.
COLD_START_SCALES = (0.1, 1.0, 10.0, 100.0)


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
