"""Mixup (Zhang et al. 2017): lambda sampling, pairing, mixed inputs, soft targets.

lambda ~ Beta(alpha, alpha) is drawn for a whole epoch at once from a seeded
numpy Generator (torch has no Beta sampler that takes a generator) and moved
to the device in one copy; pairing permutations come from a device
torch.Generator. So no training step waits on the host, and CPU and GPU runs
of one seed see the same lambdas.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F


def sample_lambdas(rng: np.random.Generator, alpha: float, steps: int, batch_size: int,
                   per_sample: bool) -> np.ndarray:
    """(steps,) or (steps, batch_size) mixing weights; all ones when alpha == 0 (no mixup)."""
    shape = (steps, batch_size) if per_sample else (steps,)
    if alpha == 0:
        return np.ones(shape)
    return rng.beta(alpha, alpha, size=shape)


def pair_permutation(batch: int, generator: torch.Generator, device) -> torch.Tensor:
    """Partner index of every sample: a random permutation of the batch, drawn on the device."""
    return torch.randperm(batch, generator=generator, device=device)


def interpolate(x_a: torch.Tensor, x_b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """lam * x_a + (1 - lam) * x_b; lam is a scalar or one weight per sample."""
    weight = lam.reshape(-1, *([1] * (x_a.dim() - 1))).to(x_a.dtype)
    return weight * x_a + (1 - weight) * x_b


def mix(x: torch.Tensor, lam: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """lam * x + (1 - lam) * x[partner]: the mixed batch the network sees."""
    return interpolate(x, x[partner], lam)


def soft_targets(y_a: torch.Tensor, y_b: torch.Tensor, lam: torch.Tensor, num_classes: int) -> torch.Tensor:
    """lam * e_{y_a} + (1 - lam) * e_{y_b}, (B, C) float32; num_classes fixes C even if a batch lacks classes."""
    weight = lam.reshape(-1, 1).float()
    return weight * F.one_hot(y_a, num_classes).float() + (1 - weight) * F.one_hot(y_b, num_classes).float()


def mixup_batch(x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, generator: torch.Generator,
                num_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mixed inputs and their soft targets for one batch."""
    partner = pair_permutation(x.shape[0], generator, x.device)
    return mix(x, lam, partner), soft_targets(y, y[partner], lam, num_classes)


def default_triple(num_classes: int, seed: int) -> list:
    """Three distinct classes drawn from all C classes (not only the first ten)."""
    return sorted(int(c) for c in np.random.default_rng(seed).choice(num_classes, size=3, replace=False))


def triple_pair_types(triple) -> list:
    """Same-class pairs (a,a), (b,b), (c,c), then different-class pairs (a,b), (a,c), (b,c)."""
    a, b, c = triple
    return [(a, a), (b, b), (c, c), (a, b), (a, c), (b, c)]


def triple_pairs(labels: np.ndarray, triple, pairs_per_type: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Indices (index_a, index_b) of `pairs_per_type` image pairs for every pair type of the triple.

    Drawn once from `seed` alone, so the same pairs are used at every epoch.
    Same-class pairs join two different images when the class has two.
    """
    rng = np.random.default_rng(seed)
    first, second = [], []
    for class_a, class_b in triple_pair_types(triple):
        pool_a = np.flatnonzero(labels == class_a)
        pool_b = np.flatnonzero(labels == class_b)
        if pool_a.size == 0 or pool_b.size == 0:
            raise ValueError(f"class {class_a if pool_a.size == 0 else class_b} has no training samples")
        pick_a = rng.choice(pool_a, size=pairs_per_type, replace=pool_a.size < pairs_per_type)
        if class_a == class_b and pool_a.size > 1:
            # a partner at a random non-zero offset within the class: never the image itself
            offset = rng.integers(1, pool_a.size, size=pairs_per_type)
            position = np.searchsorted(pool_a, pick_a)
            pick_b = pool_a[(position + offset) % pool_a.size]
        else:
            pick_b = rng.choice(pool_b, size=pairs_per_type, replace=pool_b.size < pairs_per_type)
        first.append(pick_a)
        second.append(pick_b)
    return np.concatenate(first), np.concatenate(second)


def lambda_grid(count: int) -> np.ndarray:
    """`count` mixing weights evenly spaced on [0, 1] (a single 1.0 when count == 1)."""
    return np.linspace(0.0, 1.0, count) if count > 1 else np.ones(1)


def mixup_grid(index_a: np.ndarray, index_b: np.ndarray, lambdas: np.ndarray):
    """Every pair at every lambda: flat (index_a, index_b, lam), lambda-major."""
    lam = np.repeat(lambdas, index_a.size)
    return np.tile(index_a, lambdas.size), np.tile(index_b, lambdas.size), lam
