"""The fit's search over gamma: the optima along log gamma, each with the least-squares scale and
residual against the data, on a grid and then refined (`ufm.fit` in ufm/fitting.py is its caller).

For each gamma the best s is the least-squares scale max(0, <P H, H*>) / |H*|^2 (a negative
multiple of the optimum is no agreement with it: s = 0, residual 1). log gamma is searched on a grid
of GRID_PER_DECADE points per decade (MAE_GRID_PER_DECADE for mae), solved in one batch (or, where
its Newton matrices would be large, BATCH_ELEMENTS, one gamma after another from large to small,
each from the last). Each solution comes with its tangent dx/dlog gamma (differentiating
stationarity: one more solve with the last Newton factor), hence the residual's slope. The
refinement (`_refine`) then goes to the side of the best grid point where the residual falls, solves
1/6, 1/3 and 1/2 of the way to the next grid point in one batch, and takes steps to the minimum of
the cubic through the residuals and slopes at the best point and its neighbour on that side, until
that minimum is within LOG_GAMMA_XATOL (1e-5) of a solved point (then one last such step, below it):
a planted gamma comes back to about 1e-6 and an exact optimum with a residual below 1e-6
(tests/test_ufm_planted.py; at the earlier 1e-2 the residual of an exact optimum was 1e-6 to 1e-5),
in a few levels after the grid. mae's residual has kinks in log gamma (wherever a logit changes
piece), where slopes mislead a cubic: its refinement (`_refine_kinked`) is bounded Brent on the
residual's values between the best grid point's neighbours, to KINKED_XATOL.

Not identifiable. Where the shape of H* (H* up to a positive factor) is the same at every grid gamma
to SHAPE_RTOL, gamma and s are not identifiable, only s H* is (`_shape_varies`): e.g. mse with a
simplex-ETF classifier and b = 0, where H* = W^T (kappa t~) / (C/(C-1) + gamma). mae's shape is
moreover constant over whole ranges of gamma: below the gamma at which every logit that can sit on
its target does (with r = C: H* = W^+ (kappa t~ - b), interpolation), and above the one at which none
does. A fit that lands in such a range returns one gamma of it, with the same residual as any other:
there, gamma is only bounded, not determined (the refinement stops where the residual's change
across its bracket is within rounding, FLAT_ULPS).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from ufm.optimum import _Solved, _solve
from ufm.problem import EPS, NEWTON_LOSSES, _Problem, _gammas

# Where the grid's k gammas x m targets x C^2 entries of Newton matrices exceed this, they are solved
# one gamma after the other: beyond a few MB the batch's memory traffic costs more than its calls save.
BATCH_ELEMENTS = 2 ** 20
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
    of the cubic through both residuals and slopes, at most width / 2; width / 2 where the cubic has
    no minimum in between. The refinement's start is the best point solved, so its residual is at
    most end's: then the cubic falls from start and comes back up by end, and has its minimum in
    between (only rounding can defeat that, when width / 2 is as good a step as any)."""
    f0, f1 = start.residual, end.residual
    d0, d1 = start.slope * width, end.slope * width  # slopes in t = offset / width, d0 < 0
    a, b = d0 + d1 - 2 * (f1 - f0), 3 * (f1 - f0) - 2 * d0 - d1  # f(t) = f0 + d0 t + b t^2 + a t^3
    # f'(t) = 3 a t^2 + 2 b t + d0: its root where f'' > 0, written without cancellation
    discriminant = b * b - 3 * a * d0
    t = -d0 / (b + math.sqrt(discriminant)) if discriminant >= 0 and b + math.sqrt(discriminant) > 0 else math.inf
    return min(t, 0.5) * width


def _shape_varies(solutions: _Solutions, grid) -> bool:
    """Whether H* / |H*| differs by more than SHAPE_RTOL between grid gammas."""
    x = torch.stack([solutions.points[value].x for value in grid]) * solutions.data.counts[:, None].sqrt()
    shapes = x / x.norm(dim=(1, 2), keepdim=True)  # the n rows, not the unique targets
    return bool(((shapes[1:] - shapes[0]).norm(dim=(1, 2)) > SHAPE_RTOL).any())
