"""Vision Transformers with 4x4 patches on torchvision's VisionTransformer.

vit_b_4 is the ViT-B of Fisher, Meng & Papyan 2024 (12 layers, 12 heads,
hidden 768); vit_tiny_4 is ViT-Ti (12 layers, 3 heads, hidden 192). --width
scales the per-head dimension (64 at width 1).
"""
import math

from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from .base import FeatureClassifier, scaled

PATCH = 4
HEAD_DIM = 64
MLP_RATIO = 4


def _vit(layers, heads, in_channels, image_size, num_classes, width):
    if image_size % PATCH:
        raise ValueError(f"ViT with {PATCH}x{PATCH} patches needs an image size divisible by {PATCH}, got {image_size}")
    hidden = heads * scaled(HEAD_DIM, width)
    body = VisionTransformer(image_size=image_size, patch_size=PATCH, num_layers=layers, num_heads=heads,
                             hidden_dim=hidden, mlp_dim=MLP_RATIO * hidden, num_classes=num_classes)
    if in_channels != 3:
        body.conv_proj = nn.Conv2d(in_channels, hidden, kernel_size=PATCH, stride=PATCH)
        fan_in = in_channels * PATCH * PATCH  # torchvision's patch-embedding initialisation
        nn.init.trunc_normal_(body.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(body.conv_proj.bias)
    body.heads = nn.Identity()  # torchvision's forward then returns the class token's features
    # embed: the patch embeddings (before the class token, which is the same for every input there);
    # each block's output is read at its class token.
    stages = {"embed": "body.conv_proj",
              **{f"block{i}": f"body.encoder.layers.encoder_layer_{i}" for i in range(layers)}}
    return FeatureClassifier(body, hidden, num_classes, convolutional=False, stages=stages)


def vit_b_4(in_channels, image_size, num_classes, width=1.0):
    return _vit(12, 12, in_channels, image_size, num_classes, width)


def vit_tiny_4(in_channels, image_size, num_classes, width=1.0):
    return _vit(12, 3, in_channels, image_size, num_classes, width)
