"""Sizing a diffusers ``UNet2DModel`` for an image size (the network diffaug trains itself)."""

from __future__ import annotations


def unet_config_for(image_size: int, channels: int, num_classes: int | None = None, *, width: int | None = None,
                    layers_per_block: int | None = None) -> dict:
    """A ``UNet2DModel`` config scaled to the image size.

    Resolutions halve down to 2x2 (at most 4 levels); base width 32 for images up to 8 px, 64 up to 16 px, 128
    up to 32 px and 64 above (so that a 64-px training step with its default batch of 32 stays near 4 GB on a CPU:
    width 128 took 7 GB, and the batch of 128 it had before was killed at 24 GB); self-attention at 16 and 8 px for
    images of 32 px and more. With ``num_classes`` the net gets
    ``num_classes + 1`` class embeddings: the last one is the null label used for label dropout.
    """
    if image_size < 4 or image_size & (image_size - 1):
        raise ValueError(f"image_size must be a power of two >= 4, got {image_size}")
    levels = min(4, image_size.bit_length() - 2)  # 8 px -> 3 levels (8, 4, 2)
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
        "norm_num_groups": 8 if base <= 32 else 32,
        "num_class_embeds": None if num_classes is None else num_classes + 1,
    }
