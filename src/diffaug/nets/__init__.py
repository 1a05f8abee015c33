"""Architectures the project configures itself: the diffusion UNet factory."""

from .unet import unet_config_for

__all__ = ["unet_config_for"]
