"""Sizing a diffusers ``UNet2DModel`` for an image size (the network diffaug trains itself)."""

from __future__ import annotations

from ..errors import InputError


def _norm_groups(width: int) -> int:
    return 8 if width <= 32 else 32


def check_unet_size(width: int | None, layers_per_block: int | None) -> None:
    """One-line :class:`InputError` unless ``width`` (None: sized for the image) is a positive multiple of the
    UNet's GroupNorm groups (8 up to 32, 32 above) and ``layers_per_block`` (None: sized) is >= 1."""
    if width is not None and (width < 1 or width % _norm_groups(width)):
        raise InputError(f"UNet width {width} must be a positive multiple of {_norm_groups(width)} (its GroupNorm "
                         "groups; 8 up to width 32, 32 above), e.g. 32, 64 or 128")
    if layers_per_block is not None and layers_per_block < 1:
        raise InputError(f"layers_per_block must be >= 1, got {layers_per_block}")


def unet_config_for(image_size: int, channels: int, num_classes: int | None = None, *, width: int | None = None,
                    layers_per_block: int | None = None) -> dict:
    """A ``UNet2DModel`` config scaled to the image size.

    Resolutions halve in at most 4 levels, not below 4x4 (8 px: 8, 4; 32 px: 32 ... 4; 64 px: 64 ... 8); base width
    32 for images up to 8 px, 64 up to 16 px, 128 up to 32 px and 64 above (so that a 64-px training step with its
    default batch of 32 stays near 4 GB on a CPU: width 128 took 7 GB, and the batch of 128 it had before was
    killed at 24 GB); self-attention at 16 and 8 px for
    images of 32 px and more. With ``num_classes`` the net gets
    ``num_classes + 1`` class embeddings: the last one is the null label used for label dropout.
    """
    if image_size < 4 or image_size & (image_size - 1):
        raise ValueError(f"image_size must be a power of two >= 4, got {image_size}")
    levels = min(4, image_size.bit_length() - 2)  # 8 px -> 2 levels (8, 4)
    check_unet_size(width, layers_per_block)
    base = width or (32 if image_size <= 8 else 64 if image_size <= 16 else 128 if image_size <= 32 else 64)
    mults = [1, 2, 2, 2][:levels]
    resolutions = [image_size >> i for i in range(levels)]
    attn = [image_size >= 32 and r in (16, 8) for r in resolutions]
    return {
        "sample_size": image_size,
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": [base * m for m in mults],
        "layers_per_block": layers_per_block or (1 if image_size <= 8 else 2),
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "norm_num_groups": _norm_groups(base),
        "num_class_embeds": None if num_classes is None else num_classes + 1,
    }
