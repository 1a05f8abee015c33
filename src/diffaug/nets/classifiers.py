"""Small image classifiers for the embedded default (and tests). Inputs are images in [0, 1]."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """A 3-conv CNN for small images (e.g. 8x8 digits); ``forward_features`` gives the penultimate features.

    Args:
        channels: input channels.
        num_classes: output classes.
        width: channels of the first conv (doubled in the next two).
    """

    def __init__(self, channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x * 2 - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))
