"""ResNet-18/34/50 on torchvision's ResNet, with the CIFAR stem and --width scaling."""
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .base import FeatureClassifier, scaled

RESNET_PLANES = (64, 128, 256, 512)


def _cifar_resnet(block, layers, in_channels, num_classes, width):
    planes = [scaled(p, width) for p in RESNET_PLANES]
    # torchvision's constructor builds (and initialises) the full-width network; on the meta
    # device that costs nothing, and every module with parameters is replaced below.
    with torch.device("meta"):
        body = ResNet(block, layers)
    # CIFAR stem: 3x3 stride-1 conv and no max-pool (He et al. 2016, section 4.2),
    # then torchvision's own stages rebuilt at the scaled widths.
    body.inplanes = planes[0]
    body.conv1 = nn.Conv2d(in_channels, planes[0], kernel_size=3, stride=1, padding=1, bias=False)
    body.bn1 = nn.BatchNorm2d(planes[0])
    body.maxpool = nn.Identity()
    body.layer1 = body._make_layer(block, planes[0], layers[0])
    body.layer2 = body._make_layer(block, planes[1], layers[1], stride=2)
    body.layer3 = body._make_layer(block, planes[2], layers[2], stride=2)
    body.layer4 = body._make_layer(block, planes[3], layers[3], stride=2)
    body.fc = nn.Identity()  # torchvision's forward then ends at the pooled features
    assert not any(t.is_meta for t in list(body.parameters()) + list(body.buffers()))
    for module in body.modules():  # torchvision's initialisation, for the rebuilt layers
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    # The stem's output is that of the (identity) max-pool slot; layer4's spatial mean is the features.
    stages = {"stem": "body.maxpool", **{f"layer{i}": f"body.layer{i}" for i in range(1, 5)}}
    return FeatureClassifier(body, planes[3] * block.expansion, num_classes, convolutional=True, stages=stages)


def resnet18(in_channels, image_size, num_classes, width=1.0):
    return _cifar_resnet(BasicBlock, [2, 2, 2, 2], in_channels, num_classes, width)


def resnet34(in_channels, image_size, num_classes, width=1.0):
    return _cifar_resnet(BasicBlock, [3, 4, 6, 3], in_channels, num_classes, width)


def resnet50(in_channels, image_size, num_classes, width=1.0):
    return _cifar_resnet(Bottleneck, [3, 4, 6, 3], in_channels, num_classes, width)
