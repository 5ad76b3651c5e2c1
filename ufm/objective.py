"""The objective of the differentiable losses in the logits, for Newton (ufm/newton.py): per-row
losses written out for the line search, autograd's gradient through `losses.build_loss`, and the
Newton matrix from the logit Hessian written out (cross-entropy and focal by the chain rule through
log-softmax, focal's per-class term by hand, smooth_l1 diagonal). The Hessian and the row losses set
Newton's speed only; the answer is the gradient's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ufm.problem import SOFTMAX_LOSSES, SolverError, _Problem

SMOOTH_L1_BETA = 1.0  # losses.smooth_l1's beta: its curvature is 1 where |z - kappa t~| < beta
ROW_LOSS_RTOL = 1e-10    # _row_losses against build_loss's batch mean: rounding, far below any formula slip


def _row_losses(problem: _Problem, z, t_smooth) -> torch.Tensor:
    """(m,) per-row losses, for the line search and the choice of starts only: losses.py's
    per-sample loss written out on the smoothed targets (a loss added to losses.py needs its form
    here). The gradient, hence the optimum, is always autograd's through build_loss."""
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
    raise ValueError(f"ufm: no per-row form of the loss {name!r} in ufm/objective.py (losses.py has one)")


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
