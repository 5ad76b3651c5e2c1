"""The fit of the UFM optimum to learned features: `fit` and its metrics.

For learned features H (n, d) of mixup points with targets T, and P the projection onto the row
space of W,

    min over s >= 0, gamma in the search range of  || P H - s H*(gamma) ||_F

searched by ufm/search.py. One convention: H is not centred. The UFM has no free offset: its
features are the variables that the regulariser (gamma / 2) |h|^2 pulls to 0 and the network's own
logits W h + b read. Centring H by the mean of the class means mu while solving with b fitted the
model H = mu + s H*(b), which is not the UFM (issue 20: an exact optimum planted as H came back with a
residual of 0.08 and gamma 7x off for mse); centring and solving with b + W mu instead would be a UFM
whose regulariser pulls towards mu, also a different model. Uncentred, features planted as
s h*(T; W, b, gamma) give back s and gamma (tests/test_ufm_planted.py). Of the residual,
`scatter_floor` is what the scatter of the rows that share a target sets alone, which no (s, gamma)
explains (within-target collapse), and `shape_residual` the residual of the per-target means, the
distance to the optimum's shape.

The gamma range is GAMMA_RANGE times s_max^2 (s_max the largest singular value of W): the optimum's
shape depends on gamma only through gamma / |W|^2 (scaling W by a acts as dividing gamma by a^2). At
the top, 1e4 s_max^2, the optimum moves the logits by at most 1e-4 |grad_z l| (|W h*| <= s_max^2
|grad_z l| / gamma): it is the linear response -W^T grad l(b) / gamma, whose shape no larger gamma
changes. At the bottom, 1e-8 s_max^2, cross-entropy's optimum for a one-hot target has logit margins
near 18 (C = 10) to 20 (C = 100) with a simplex-ETF classifier, beyond those of trained networks;
there its shape changes only logarithmically in gamma. A fitted gamma at (within 2 LOG_GAMMA_XATOL
of) either end is flagged `gamma_at_bound`: the data prefer a gamma outside the range.

Where the optimum's shape does not change with gamma (see "Not identifiable" in ufm/search.py), the
fit reports gamma = s = None, `identifiable` False, and the residuals of the common shape.
`curve_gamma` and `curve_scale` are always a (gamma, s) pair that reproduces the fitted s H* (the
fitted pair when identifiable), for `theory_curve`.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Tuple

import numpy as np
import torch

from ufm.mae import ZERO_RTOL
from ufm.problem import _as_float64, _check_loss, _classifier, _finite, _problem, _with_autograd
from ufm.search import _Data, _data, _Point, _Solutions, _search

GAMMA_RANGE = (1e-8, 1e4)  # in units of s_max^2, see the module docstring


class UFMFit(NamedTuple):
    metrics: dict        # plain Python values, see `fit`
    H_fit: torch.Tensor  # (n, d) float64: s H*(gamma) at the fitted gamma, rows as H


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
fit = _with_autograd(fit)


def _optimum_is_zero(solutions: _Solutions) -> bool:
    """Whether every solved optimum is h = 0 to rounding: relative to |A|_F max(1, |b - kappa t~|) /
    gamma, a bound on |x| for the losses' gradients, whose size is at most that of the target."""
    problem = solutions.problem
    size = float(problem.S.norm()) * max(1.0, float((problem.kappa * problem.smoothed - problem.b).abs().max()))
    return all(float(point.x.abs().amax()) <= ZERO_RTOL * size / math.exp(log_gamma)
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
