"""mae's optimum: the exact minimiser of the piecewise quadratic |A x + beta|_1 + gamma |x|^2 / 2
(A = U S, beta = b - kappa t~), the loss not being differentiable where a logit equals its target.

Pieces are the sets E of logits held on their targets. Primal-dual active-set steps (`_mae_pieces`)
jump from piece minimiser to piece minimiser, changing every wrong piece at once; the rows they do
not certify within MAX_PIECE_STEPS continue with a primal active-set method (`_mae`), which moves to
the next piece or to the current piece's minimiser, one change per step, until its multipliers
certify optimality. Degenerate pieces (more logits on their targets than W has rank, ties) cannot
make it cycle: the joining and the leaving logit follow Bland's rule (the lowest index), and a step
or a rate within rounding of zero blocks nothing (DEGENERATE_RATE_RTOL, NEGLIGIBLE_STEP_RTOL); the
tests perturb such cases by a few ulps, where a last bit had made it cycle on one CPU and not
another.

Either way the solver returns the unique minimiser (the objective is gamma-strongly convex) exactly,
up to the rounding of its linear algebra: h* = -W^T u / gamma with u in [-1, 1]^C (to
CERTIFICATE_RTOL), u_c = sign(r_c) wherever the logit residual r = W h* + b - kappa t~ is non-zero,
and r_c = 0 (those logits sit exactly on their targets) where |u_c| < 1: the subgradient condition.
u is the maximiser of the dual, max over [-1, 1]^C of u.(b - kappa t~) - |W^T u|^2 / (2 gamma). The
one-change method alone needs a step for each logit that changes piece, a hundred or more at C = 100
between two grid gammas; the primal-dual steps need a few.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ufm.problem import EPS, SolverError, _Problem, _cholesky_solve

# Residuals below ZERO_RTOL max(1, |b - kappa t~|) count as zero at a warm start; multipliers up to
# 1 + CERTIFICATE_RTOL count as inside [-1, 1].
ZERO_RTOL = 1e-12
CERTIFICATE_RTOL = 1e-10
# A residual off E whose rate along a step is within this fraction of |a_c| |step| of zero does not
# block the step. Such a residual's row is (to rounding) in the span of E's rows, so the step keeps it
# where it is; blocking on the sign of its rounding made the active set swap one logit in and out for
# ever (seen on an AMD EPYC, where the last bit of a product differs from an Intel Xeon's).
DEGENERATE_RATE_RTOL = 1e-12
# A step shorter than this fraction of the largest |x| any piece can have (sum_c |a_c| / gamma,
# from x = -A^T u / gamma, |u| <= 1) is rounding, not a move: where E's rows are dependent, releasing
# one leaves the piece minimiser where it is, and the rounding of the new minimiser pointed anywhere,
# so that the released logit blocked the step and joined E again, for ever.
NEGLIGIBLE_STEP_RTOL = 1e-12
MAX_PIECE_STEPS = 30  # mae's primal-dual active-set steps before the (one change per step) active-set method
MAX_ACTIVE_SET_STEPS = 2000  # one change of E per step: far above the pieces C <= a few hundred visit


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
