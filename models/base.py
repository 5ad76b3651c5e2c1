"""The model contract of DESIGN.md, shared by every architecture."""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

FEATURES = "features"  # the last stage of every model: the penultimate layer, the classifier's input


def scaled(channels: int, width: float) -> int:
    """Channel count scaled by --width, at least 1."""
    return max(1, int(round(channels * width)))


class FeatureClassifier(nn.Module):
    """`features(x)` is the penultimate layer (B, d); `classifier` is nn.Linear(d, C).

    forward(x) == classifier(features(x)) by construction; no hooks are used,
    so the NC pass can take features and logits from one call of `features`.

    `stages` names the network's stages, input to output: stage name -> the
    qualified name of the submodule whose output is that stage, the last
    always FEATURES -> "body" (the output of `features`). Per-layer
    measurement and manifold mixup reach a stage through a forward hook on
    that submodule (see layers.py), never through a copy of the forward.
    A conv net's last stage before the global average pool repeats FEATURES:
    a stage's vector is its map's spatial mean, which is what the pool hands
    to the classifier (ResNet's layer4; VGG's last pool, whose map is 1x1 at
    the input sizes that keep every pool). It stays in the list so that every
    block is named as in torchvision; mixing there (manifold mixup) mixes
    the map before a linear pool, i.e. the features.
    """

    def __init__(self, body: nn.Module, feature_dim: int, num_classes: int, convolutional: bool,
                 stages: Optional[Dict[str, str]] = None):
        super().__init__()
        self.body = body
        self.classifier = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim
        self.convolutional = convolutional  # whether channels_last memory format helps
        self.stages = {**(stages or {}), FEATURES: "body"}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
