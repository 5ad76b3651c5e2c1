"""Model registry: name -> builder(in_channels, image_size, num_classes, width) -> FeatureClassifier."""
from .base import FeatureClassifier
from .mlp import mlp
from .resnet import resnet18, resnet34, resnet50
from .vgg import vgg11_bn, vgg16_bn
from .vit import vit_b_4, vit_tiny_4
from .wrn import wrn16_8, wrn28_10, wrn40_10

MODELS = {
    "mlp": mlp,
    "resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50,
    "wrn16_8": wrn16_8, "wrn28_10": wrn28_10, "wrn40_10": wrn40_10,
    "vgg11_bn": vgg11_bn, "vgg16_bn": vgg16_bn,
    "vit_b_4": vit_b_4, "vit_tiny_4": vit_tiny_4,
}


def build_model(name: str, in_channels: int, image_size: int, num_classes: int, width: float = 1.0) -> FeatureClassifier:
    return MODELS[name](in_channels, image_size, num_classes, width)


__all__ = ["MODELS", "FeatureClassifier", "build_model"]
