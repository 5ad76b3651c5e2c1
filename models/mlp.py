"""Multi-layer perceptron: the quick CPU model for the bundled digits."""
from torch import nn

from .base import FeatureClassifier, scaled

MLP_HIDDEN = 256
MLP_DEPTH = 3  # hidden layers; the last one's output is the feature layer


def mlp(in_channels: int, image_size: int, num_classes: int, width: float = 1.0) -> FeatureClassifier:
    hidden = scaled(MLP_HIDDEN, width)
    layers, fan_in, stages = [nn.Flatten()], in_channels * image_size * image_size, {}
    for depth in range(1, MLP_DEPTH + 1):
        layers += [nn.Linear(fan_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        fan_in = hidden
        if depth < MLP_DEPTH:  # the last hidden layer is the features stage
            stages[f"hidden{depth}"] = f"body.{len(layers) - 1}"  # its ReLU's output
    return FeatureClassifier(nn.Sequential(*layers), hidden, num_classes, convolutional=False, stages=stages)
