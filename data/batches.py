"""Device-resident batching: shuffling, crop/flip and normalisation on the device.

Nothing here reads back to the host, so a training epoch issues its kernels
without waiting on the GPU (cf. KellerJordan/cifar10-airbench).
"""
from __future__ import annotations

from typing import Iterator, Tuple

import torch
import torch.nn.functional as F

CROP_PADDING = 4  # pixels of zero padding before the random crop (standard CIFAR recipe)


def channel_stats(images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (unbiased) std of uint8 images, on the 0..255 scale, in float64.

    Computed exactly from each channel's 256-bin histogram, so a CIFAR-sized split
    needs no float64 copy of its pixels (1.2 GB). A constant channel gets std 1.
    """
    values = torch.arange(256, dtype=torch.float64, device=images.device)
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        n = counts.sum()
        mean = (counts * values).sum() / n
        means.append(mean)
        stds.append(((counts * (values - mean).square()).sum() / (n - 1)).sqrt())
    mean, std = torch.stack(means), torch.stack(stds)
    return mean, torch.where(std > 0, std, torch.ones_like(std))


class Normalizer:
    """uint8 (B, C, H, W) -> float32 standardised, optionally channels_last."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, device, channels_last: bool):
        self.mean = mean.float().to(device).view(1, -1, 1, 1)
        self.inv_std = (1.0 / std).float().to(device).view(1, -1, 1, 1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) * self.inv_std
        return x.contiguous(memory_format=self.memory_format)


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = CROP_PADDING) -> torch.Tensor:
    """Per-image random crop after zero padding, then a random horizontal flip."""
    B, C, H, W = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (B, 1), generator=generator, device=device)
    dx = torch.randint(0, 2 * padding + 1, (B, 1), generator=generator, device=device)
    flip = torch.rand(B, 1, generator=generator, device=device) < 0.5
    rows = dy + torch.arange(H, device=device)
    cols = dx + torch.arange(W, device=device)
    cols = torch.where(flip, cols.flip(1), cols)
    batch = torch.arange(B, device=device)[:, None, None, None]
    channel = torch.arange(C, device=device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


class TrainBatches:
    """Shuffled minibatches of a device-resident split, augmented on the device.

    `drop_last` keeps every batch the same shape (for torch.compile); otherwise
    the last batch is the remainder, unless that is a single sample: batch norm
    cannot take batch statistics of one sample, so it is dropped.
    """

    def __init__(self, images, labels, batch_size: int, normalize: Normalizer, generator: torch.Generator,
                 augment: bool, drop_last: bool):
        self.images, self.labels = images, labels
        self.batch_size, self.normalize, self.generator = batch_size, normalize, generator
        self.augment, self.drop_last = augment, drop_last

    def __len__(self) -> int:
        full, remainder = divmod(self.labels.shape[0], self.batch_size)
        return full + (remainder > 1 and not self.drop_last)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(self.labels.shape[0], generator=self.generator, device=self.labels.device)
        for step in range(len(self)):
            index = order[step * self.batch_size:(step + 1) * self.batch_size]
            images = self.images[index]
            if self.augment:
                images = random_crop_flip(images, self.generator)
            yield self.normalize(images), self.labels[index]


def eval_batches(images, labels, batch_size: int, normalize: Normalizer) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Clean (unaugmented, unshuffled) batches, in order."""
    for start in range(0, labels.shape[0], batch_size):
        yield normalize(images[start:start + batch_size]), labels[start:start + batch_size]
