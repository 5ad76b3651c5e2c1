"""The mixup unconstrained-features optimum (Fisher, Meng & Papyan 2024, section 3) of every target.

With the classifier W (C, d), b (C,) fixed, the features of a point with soft target t are free
variables:

    h*(t) = argmin_h  l(W h + b, t) + (gamma / 2) |h|^2          (gamma > 0)

l is the per-sample loss of `losses.build_loss` (label smoothing, mse_scale and focal_gamma included):
T holds the raw mixup targets lam e_a + (1 - lam) e_b, and the loss smooths them (t~ below). Every
solve is in the r coordinates of the row space of W, for the unique targets only (ufm/problem.py).

Solvers, by loss:
- mse: the closed form h* = (W^T W + gamma I)^-1 W^T (kappa t~ - b), i.e. x = S / (S^2 + gamma)
  U^T (kappa t~ - b), kappa = mse_scale (`_solve`, here).
- cross_entropy, focal, smooth_l1: Newton on the r coordinates, every unique target and every gamma
  of a search level in one batch (ufm/newton.py, its objective and curvature in ufm/objective.py).
  A point not converged raises SolverError, never a silent approximation.
- mae, not differentiable where a logit equals its target: the exact minimiser of a piecewise
  quadratic by active-set methods, certified by the subgradient condition (ufm/mae.py).

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
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch

from ufm.mae import _mae
from ufm.newton import _cold_starts, _lowest, _newton
from ufm.problem import _Problem, _as_float64, _check_gamma, _gammas, _problem, _with_autograd


class _Solved(NamedTuple):
    x: torch.Tensor                  # (k, m, r) optimum coordinates of the unique targets at k gammas
    tangent: Optional[torch.Tensor]  # (k, m, r) their derivative in log gamma, where asked for


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


# By assignment, not as @_with_autograd: mutmut (bench/mutation.py) leaves decorated functions unmutated.
optimal_features, newton_features = map(_with_autograd, (optimal_features, newton_features))


def _solve(problem: _Problem, gammas: torch.Tensor, starts: Sequence[torch.Tensor] = (), cold: bool = True,
           tangents: bool = False) -> _Solved:
    """The optimum of every unique target at each of the k gammas, all in one batch (the rows are
    independent problems). starts: candidate starting points (k, m, r); Newton takes per row the one
    of lowest objective, cold starts included if `cold` (see newton._cold_starts); mae the first, else
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
