"""Writing figures and image grids as PNG files, atomically."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import atomic_write_bytes


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Lay out, write atomically (creating the folder) and close a matplotlib figure as PNG; returns the path."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int) -> Path:
    """Write images ``[N, C, H, W]`` in [0, 1] as one PNG grid, ``nrow`` per row, atomically; small images are
    enlarged (nearest) to at least 64 px so they can be seen."""
    import io

    import torch.nn.functional as F
    from torchvision.utils import save_image

    scale = max(1, 64 // images.shape[-1])
    buf = io.BytesIO()
    save_image(F.interpolate(images.detach().float().cpu(), scale_factor=scale, mode="nearest"), buf, format="png",
               nrow=nrow, padding=2, pad_value=0.5)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
