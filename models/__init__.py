"""Model registry: name -> builder(in_channels, image_size, num_classes, width) -> FeatureClassifier.

Builders are imported on first use: importing torchvision costs seconds, and
the default MLP run (and every `--help`) should not pay for it.
"""
import importlib

from .base import FeatureClassifier

# name -> submodule that defines a builder function of the same name
MODELS = {
    "mlp": "mlp",
    "resnet18": "resnet", "resnet34": "resnet", "resnet50": "resnet",
    "wrn16_8": "wrn", "wrn28_10": "wrn", "wrn40_10": "wrn",
    "vgg11_bn": "vgg", "vgg16_bn": "vgg",
    "vit_b_4": "vit", "vit_tiny_4": "vit",
}


def build_model(name: str, in_channels: int, image_size: int, num_classes: int, width: float = 1.0) -> FeatureClassifier:
    builder = getattr(importlib.import_module(f".{MODELS[name]}", __name__), name)
    return builder(in_channels, image_size, num_classes, width)


__all__ = ["MODELS", "FeatureClassifier", "build_model"]
