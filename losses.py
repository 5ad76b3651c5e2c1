"""Losses over logits (B, C) and a soft-target matrix (B, C), so that every loss works with mixup.

Each returns the mean over the batch of a per-sample loss:
- cross_entropy: -sum_c t_c log softmax(z)_c.
- focal (Lin et al. 2017), soft-target form: -sum_c t_c (1 - p_c)^gamma log p_c.
- mse (Han, Papyan & Donoho 2021): 1/2 sum_c (z_c - kappa t_c)^2.
- mae: sum_c |z_c - kappa t_c|.
- smooth_l1: sum_c Huber_1(z_c - kappa t_c)  (torch's smooth_l1 with beta = 1).
The regression losses act on the logits, like the MSE of the NC literature;
kappa (--mse-scale) scales their one-hot target.

Label smoothing is a transform of the targets, t -> (1 - eps) t + eps / C,
applied by `build_loss` in front of every loss (for cross-entropy this is
exactly torch's `label_smoothing`), so no loss can silently ignore it.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(**_) -> LossFn:
    def loss(logits, targets):
        return F.cross_entropy(logits, targets)
    return loss


def focal(focal_gamma: float = 2.0, **_) -> LossFn:
    def loss(logits, targets):
        log_p = F.log_softmax(logits, dim=1)
        # 1 - p as -expm1(log p): exact near p = 1; the floor keeps d/dp (1-p)^gamma finite
        # for gamma < 1 once p saturates to 1 (else 0 * inf = NaN gradients).
        one_minus_p = (-torch.expm1(log_p)).clamp(min=torch.finfo(log_p.dtype).tiny)
        weight = one_minus_p.pow(focal_gamma)
        return -(targets * weight * log_p).sum(dim=1).mean()
    return loss


def mse(mse_scale: float = 1.0, **_) -> LossFn:
    def loss(logits, targets):
        return 0.5 * (logits - mse_scale * targets).square().sum(dim=1).mean()
    return loss


def mae(mse_scale: float = 1.0, **_) -> LossFn:
    def loss(logits, targets):
        return (logits - mse_scale * targets).abs().sum(dim=1).mean()
    return loss


def smooth_l1(mse_scale: float = 1.0, **_) -> LossFn:
    def loss(logits, targets):
        return F.smooth_l1_loss(logits, mse_scale * targets, reduction="none", beta=1.0).sum(dim=1).mean()
    return loss


LOSSES: Dict[str, Callable[..., LossFn]] = {
    "cross_entropy": cross_entropy, "mse": mse, "mae": mae, "smooth_l1": smooth_l1, "focal": focal,
}


def smooth_targets(targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """(1 - eps) t + eps / C: every row keeps its sum of 1."""
    return targets * (1.0 - label_smoothing) + label_smoothing / targets.shape[1]


def build_loss(name: str, label_smoothing: float = 0.0, **options) -> LossFn:
    """options: mse_scale, focal_gamma (each loss takes the ones it uses); label smoothing applies to all."""
    loss = LOSSES[name](**options)
    if not label_smoothing:
        return loss
    return lambda logits, targets: loss(logits, smooth_targets(targets, label_smoothing))
