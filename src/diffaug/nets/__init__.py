"""Architectures the project owns or configures: the diffusion UNet factory and small classifiers."""

from .classifiers import SmallCNN
from .unet import unet_config_for

__all__ = ["SmallCNN", "unet_config_for"]
