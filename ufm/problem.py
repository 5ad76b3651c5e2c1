"""The reduced problem every solver of the UFM optimum works on: the inputs checked, the unique
targets, the row space of W (see ufm/__init__.py for the package's map).

Stationarity gives gamma h* = -W^T grad_z l, so h* lies in the row space of W. With the thin SVD
W = U S V^T of numerical rank r <= C (singular values below RANK_RTOL s_max count as zero), h = x V
and z = b + U S x: every solve has r unknowns, not d. The optimum depends on the target only, so
only the unique rows of T are solved (mixup points of one pair type and lambda share one), and the
result is scattered back to every row. Pure functions on tensors, float64 throughout.
"""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Callable, Tuple

import numpy as np
import torch

from losses import LOSSES, build_loss, focal, smooth_targets

LOSS_OPTIONS = ("label_smoothing", "mse_scale", "focal_gamma")
SOFTMAX_LOSSES = ("cross_entropy", "focal")
NEWTON_LOSSES = ("cross_entropy", "focal", "smooth_l1")
FOCAL_GAMMA = inspect.signature(focal).parameters["focal_gamma"].default  # losses.focal's default
EPS = float(torch.finfo(torch.float64).eps)
# Singular values of W below this fraction of the largest count as zero. Above it, K^+ adds at
# most 1 / RANK_RTOL^2 = 1e12 to the condition number of the logit-space Newton system.
RANK_RTOL = 1e-6


class SolverError(RuntimeError):
    """The optimum was not found to the tolerance (no convergence, a saddle, no descent): never approximated."""


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


@dataclass
class _Problem:
    """One classifier, loss and set of unique targets, in the row-space coordinates of W."""
    loss_name: str
    loss: Callable
    kappa: float             # mse_scale
    focal_gamma: float       # focal's focusing parameter (for `objective._row_losses`)
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
    return _Problem(
        loss_name, build_loss(loss_name, **loss_options),
        float(loss_options.get("mse_scale", 1.0)), float(loss_options.get("focal_gamma", FOCAL_GAMMA)), targets,
        smooth_targets(targets, loss_options.get("label_smoothing", 0.0)), inverse, b,
        Vh[:rank], U[:, :rank], S[:rank], complete[:, rank:])


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


def _gammas(values, problem: _Problem) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float64, device=problem.S.device).reshape(-1)



def _cholesky_solve(factor: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """(m, C) solutions of L L^T v = rhs: two triangular solves, several times faster on the CPU
    than torch.cholesky_solve for a batch of small systems with one right-hand side."""
    half = torch.linalg.solve_triangular(factor, rhs.unsqueeze(2), upper=False)
    return torch.linalg.solve_triangular(factor.mT, half, upper=True).squeeze(2)
