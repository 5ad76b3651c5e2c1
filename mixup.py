"""Mixup (Zhang et al. 2017) and CutMix (Yun et al. 2019): lambda sampling, pairing, mixed inputs, soft targets.

lambda ~ Beta(alpha, alpha) is drawn for a whole epoch at once from a seeded
numpy Generator (torch has no Beta sampler that takes a generator) and moved
to the device in one copy; pairing permutations come from a device
torch.Generator. So no training step waits on the host, and CPU and GPU runs
of one seed see the same lambdas. CutMix's boxes and the per-batch choice of
rule (--mix-prob, --switch-prob) are drawn the same way, after mixup's lambdas
and only when asked for, so plain mixup runs keep their random streams.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

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


# ---------------------------------------------------------------- CutMix (Yun et al. 2019) and the rule switch

MIX_RULES = ("mixup", "cutmix")
BOX_STREAM = 24  # second word of the feature boxes' seed: a stream apart from every other one drawn from --seed


def box_sides(lam: torch.Tensor, centre: torch.Tensor, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """[low, high) pixel bounds, along one axis of `size` pixels, of a box side of length size * sqrt(1 - lam)
    centred at `centre` (pixels); the ends are rounded to pixels, then clipped at the border."""
    half = size * torch.sqrt((1 - lam).clamp(min=0)) / 2
    low = torch.floor(centre - half + 0.5).clamp(0, size)
    high = torch.floor(centre + half + 0.5).clamp(0, size)
    return low, high


def box_masks(lam: torch.Tensor, centre: torch.Tensor, height: int, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Boxes of nominal area fraction 1 - lam around `centre` ((n, 2) fractions of height and width), as masks.

    Returns (mask (n, 1, height, width) bool, the weight left to each image: 1 - the box's true area after
    rounding and clipping (n,) float32). Built from coordinate comparisons: no loop over boxes.
    """
    lam = lam.float()
    top, bottom = box_sides(lam, centre[:, 0].float() * height, height)
    left, right = box_sides(lam, centre[:, 1].float() * width, width)
    area = (bottom - top) * (right - left)
    return boxes_mask(torch.stack([top, bottom, left, right], dim=1), height, width), 1 - area / (height * width)


def paste(x_a: torch.Tensor, x_b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x_a with the pixels under `mask` (all channels) taken from x_b."""
    return torch.where(mask, x_b, x_a)


def cutmix_batch(x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, centre: torch.Tensor,
                 cut: Optional[torch.Tensor], generator: torch.Generator, num_classes: int):
    """CutMixed inputs and their soft targets, weighted by the pasted boxes' true areas.

    `lam` and `centre` are (1,) and (1, 2) for one box per batch, or (B,) and (B, 2) per sample; `cut`
    (B,) bool, when given, picks CutMix per sample and mixup (weight lam) for the others.
    """
    partner = pair_permutation(x.shape[0], generator, x.device)
    x_b = x[partner]
    mask, weight = box_masks(lam, centre, x.shape[-2], x.shape[-1])
    mixed = paste(x, x_b, mask)
    if cut is not None:
        mixed = torch.where(cut.reshape(-1, 1, 1, 1), mixed, interpolate(x, x_b, lam))
        weight = torch.where(cut, weight, lam.float())
    return mixed, soft_targets(y, y[partner], weight, num_classes)


@dataclass
class MixingDraws:
    """One epoch's host-side draws of the mixing rule, (steps,) per batch or (steps, B) per sample."""
    lam: np.ndarray     # weight of the image itself: mixup's lambda, or CutMix's nominal one; 1 where not mixed
    mixed: np.ndarray   # bool: mixed at all (--mix-prob)
    cut: np.ndarray     # bool: CutMix instead of mixup (--switch-prob)
    centre: np.ndarray  # (..., 2) CutMix box centres, fractions of height and width


def sample_mixing(rng: np.random.Generator, mixup_lams: np.ndarray, mixup_alpha: float, cutmix_alpha: float,
                  mix_prob: float, switch_prob: float) -> MixingDraws:
    """The rest of an epoch's draws, after mixup's lambdas (`mixup_lams`, from sample_lambdas).

    Nothing more is drawn for plain mixup (cutmix_alpha 0, mix_prob 1): its runs keep their streams.
    """
    shape = mixup_lams.shape
    mixed = rng.random(shape) < mix_prob if mix_prob < 1 else np.ones(shape, dtype=bool)
    if cutmix_alpha == 0:
        return MixingDraws(np.where(mixed, mixup_lams, 1.0), mixed, np.zeros(shape, dtype=bool),
                           np.zeros((*shape, 2)))
    cut = rng.random(shape) < switch_prob if mixup_alpha > 0 else np.ones(shape, dtype=bool)
    lam = np.where(cut, rng.beta(cutmix_alpha, cutmix_alpha, size=shape), mixup_lams)
    return MixingDraws(np.where(mixed, lam, 1.0), mixed, cut, rng.random((*shape, 2)))


def mixes(cfg) -> bool:
    """Whether training mixes at all (either rule, with a non-zero chance)."""
    return (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0) and cfg.mix_prob > 0


def rule_name(cfg) -> str:
    """none, mixup, cutmix or switch: the rule a run trains with (a config key to group runs by)."""
    if not mixes(cfg):
        return "none"
    return {(True, False): "mixup", (False, True): "cutmix"}.get((cfg.mixup_alpha > 0, cfg.cutmix_alpha > 0),
                                                                  "switch")


def feature_rules(cfg) -> list:
    """The rules whose mixed points the feature epochs measure: --feature-mix, else the run's rules
    (mixup for a run that does not mix, as before CutMix existed). A configuration made before these
    flags existed (a notebook's namespace without them) measures mixup's points, as it did then."""
    chosen = getattr(cfg, "feature_mix", None)
    if chosen:
        return [rule for rule in MIX_RULES if rule in chosen]
    alphas = (getattr(cfg, "mixup_alpha", 0.0), getattr(cfg, "cutmix_alpha", 0.0))
    rules = [rule for rule, alpha in zip(MIX_RULES, alphas) if alpha > 0]
    return rules or ["mixup"]


def grid_boxes(lambdas: np.ndarray, height: int, width: int, seed: int) -> np.ndarray:
    """(n, 4) int boxes (top, bottom, left, right) of the measurement's CutMix points, one per point of
    the grid (`lambdas`: each point's lambda, as mixup_grid gives them).

    height * sqrt(1 - lam) rows, rounded, and the whole number of columns that brings the area closest
    to 1 - lam, so the pasted area depends on lambda alone (every pair at one grid lambda carries the same
    weight); placed wholly inside the image at a position drawn from `seed` alone: every feature epoch,
    and a resumed run, sees the same boxes.
    """
    rng = np.random.default_rng([seed, BOX_STREAM])
    share = np.clip(1 - np.asarray(lambdas, dtype=np.float64), 0, 1)
    rows = np.rint(height * np.sqrt(share)).astype(int)
    cols = np.where(rows > 0, np.rint(share * height * width / np.maximum(rows, 1)), 0).clip(0, width).astype(int)
    top = (rng.random(rows.size) * (height - rows + 1)).astype(int)
    left = (rng.random(cols.size) * (width - cols + 1)).astype(int)
    return np.stack([top, top + rows, left, left + cols], axis=1)


def box_weight(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """1 - the area fraction of each (top, bottom, left, right) box: the weight left to the image itself."""
    return 1 - (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2]) / (height * width)


def boxes_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(n, 1, height, width) bool masks of (top, bottom, left, right) boxes, whole pixels [top, bottom) x
    [left, right) (integers, or floats of whole values)."""
    rows = torch.arange(height, device=boxes.device)
    cols = torch.arange(width, device=boxes.device)
    in_rows = (rows >= boxes[:, :1]) & (rows < boxes[:, 1:2])
    in_cols = (cols >= boxes[:, 2:3]) & (cols < boxes[:, 3:4])
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]
