"""Wide ResNets (Zagoruyko & Komodakis 2016), pre-activation, with adaptive pooling.

torchvision's wide_resnet50_2 is a different (bottleneck ImageNet) network, so
the CIFAR WRN-d-k is written here.
"""
import torch.nn.functional as F
from torch import nn

from .base import FeatureClassifier, scaled

WRN_BASE = (16, 16, 32, 64)


class _WideBlock(nn.Module):
    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x):
        activated = F.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(activated)
        out = self.conv1(activated)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + residual


def _wide_resnet(depth, widen, in_channels, num_classes, width):
    blocks_per_stage = (depth - 4) // 6
    planes = [scaled(WRN_BASE[0], width)] + [scaled(p * widen, width) for p in WRN_BASE[1:]]
    layers = [nn.Conv2d(in_channels, planes[0], 3, 1, 1, bias=False)]
    stages = {"stem": "body.0"}
    in_planes = planes[0]
    for stage, out_planes in enumerate(planes[1:]):
        for block in range(blocks_per_stage):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(_WideBlock(in_planes, out_planes, stride))
            in_planes = out_planes
        stages[f"block{stage + 1}"] = f"body.{len(layers) - 1}"  # the stage's last block
    layers += [nn.BatchNorm2d(in_planes), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    body = nn.Sequential(*layers)
    for module in body.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return FeatureClassifier(body, in_planes, num_classes, convolutional=True, stages=stages)


def wrn16_8(in_channels, image_size, num_classes, width=1.0):
    return _wide_resnet(16, 8, in_channels, num_classes, width)


def wrn28_10(in_channels, image_size, num_classes, width=1.0):
    return _wide_resnet(28, 10, in_channels, num_classes, width)


def wrn40_10(in_channels, image_size, num_classes, width=1.0):
    return _wide_resnet(40, 10, in_channels, num_classes, width)
