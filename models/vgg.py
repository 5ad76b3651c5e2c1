"""VGG-11/16 with batch norm, CIFAR variant: torchvision's layers, global pooling, one linear head."""
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from .base import FeatureClassifier, scaled


def _cifar_vgg(config, in_channels, image_size, num_classes, width):
    layers, size = [], image_size
    for entry in cfgs[config]:
        if entry == "M":
            if size >= 2:  # small inputs (8x8 digits, 28x28 MNIST) keep only the pools they can afford
                layers.append("M")
                size //= 2
        else:
            layers.append(scaled(entry, width))
    features = make_layers(layers, batch_norm=True)
    if in_channels != 3:  # torchvision's make_layers assumes RGB input
        first = features[0]
        features[0] = nn.Conv2d(in_channels, first.out_channels, kernel_size=3, padding=1)
    for module in features.modules():  # torchvision's VGG initialisation
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
    body = nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    feature_dim = [entry for entry in layers if entry != "M"][-1]
    pools = [index for index, module in enumerate(features) if isinstance(module, nn.MaxPool2d)]
    # one per pooling stage; the last repeats the features where its map is 1x1 (see FeatureClassifier)
    stages = {f"pool{k}": f"body.0.{index}" for k, index in enumerate(pools, start=1)}
    return FeatureClassifier(body, feature_dim, num_classes, convolutional=True, stages=stages)


def vgg11_bn(in_channels, image_size, num_classes, width=1.0):
    return _cifar_vgg("A", in_channels, image_size, num_classes, width)


def vgg16_bn(in_channels, image_size, num_classes, width=1.0):
    return _cifar_vgg("D", in_channels, image_size, num_classes, width)
