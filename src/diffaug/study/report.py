"""Figures and tables for people to read."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError
from ..utils.figures import save_figure


AUGMENTATION_TIMES = tuple(range(350, 701, 50))  # the paper's Figure 1 columns


def augmentation_grid(aug, images: torch.Tensor, times, generator: torch.Generator | None = None) -> torch.Tensor:
    """DiffAug views ``[N, len(times), C, H, W]`` of ``images`` at fixed times (fresh noise per view)."""
    from ..augment import DiffAug

    views = []
    for t in times:
        fixed = DiffAug(aug.denoiser, t_range=(t, t), sampler=aug.sampler, cond_weight=aug.cond_weight)
        views.append(fixed(images, generator=generator))
    return torch.stack(views, dim=1)


def show_augmentations(denoiser, out: str | Path, *, data: str = "digits", num_images: int = 4,
                       times=AUGMENTATION_TIMES, seed: int = 0, device: str = "cpu", image_size: int | None = None,
                       workers: int | None = None) -> Path:
    """The paper's Figure 1 analogue: rows of training images, columns of DiffAug views at ``times``.

    ``denoiser`` is a :class:`~diffaug.Denoiser` or a name/folder for :func:`~diffaug.load_denoiser`.
    ``digits`` / CIFAR-10 are read in memory (as before); on an image folder only the ``num_images`` picked train
    images are read (through the loader, ``workers`` processes), whole (``Resize`` + ``CenterCrop``) at
    ``image_size`` (default the denoiser's size; the denoiser runs at it).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..augment import DiffAug
    from ..data import is_in_memory, load_dataset
    from ..denoiser import Denoiser, load_denoiser

    den = denoiser if isinstance(denoiser, Denoiser) else load_denoiser(denoiser, device=device)
    streamed = not is_in_memory(data)
    if streamed:  # an image folder: the denoiser at the figure's size
        from ..data import check_size, open_splits
        from ..data.files import check_colour_kept

        size = check_size(image_size) if image_size is not None else (den.image_size or (None,))[0]
        if size is None:
            raise InputError(f"denoiser {denoiser} has no fixed image size; pass an image size for {data}")
        den = den.at_size(size)
    aug = DiffAug(den)
    for t in times:
        if not 0 <= t < den.num_timesteps:
            raise ValueError(f"time {t} is outside this denoiser's schedule [0, {den.num_timesteps})")
    if streamed:
        train = open_splits(data, channels=den.channels)["train"]
        check_colour_kept(train, den.channels, data)
    else:
        train = load_dataset(data, "train")
        den.check_images(train.images[:1], name=f"images of {data}")
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(train), generator=gen)[:num_images]
    if streamed:
        from ..data import generative_transform, read_sample

        picked = read_sample(train, generative_transform(den.image_size[0], flip=False), indices=pick, workers=workers)
        images, labels = picked.images.to(device), picked.labels
    else:
        images, labels = train.images[pick].to(device), train.labels[pick]
    num_images = images.shape[0]  # a folder with fewer training images
    with torch.no_grad():
        views = augmentation_grid(aug, images, times, generator=torch.Generator(device=device).manual_seed(seed))
    cols = 1 + len(times)
    fig, axes = plt.subplots(num_images, cols, figsize=(1.2 * cols, 1.2 * num_images + 0.4), squeeze=False)
    cmap = "gray" if images.shape[1] == 1 else None
    for r in range(num_images):
        panels = [images[r]] + [views[r, c] for c in range(len(times))]
        for c, img in enumerate(panels):
            ax = axes[r, c]
            arr = img.permute(1, 2, 0).cpu().numpy()
            ax.imshow(arr[..., 0] if cmap else arr, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title("x0" if c == 0 else f"t={times[c - 1]}", fontsize=8)
        axes[r, 0].set_ylabel(train.classes[int(labels[r])], fontsize=8)
    fig.suptitle("DiffAug views: diffuse to t, denoise in one step", fontsize=9)
    return save_figure(fig, out)


def claims_forest_plot(claims: list[dict], path: str | Path) -> Path:
    """A forest plot of the study's claims: one row per claim, the mean paired difference (dot) with its 95 %
    interval (bar) on the row's own axis (claims have different units), zero marked; green where the claim holds,
    red where it is contradicted, grey where it is not settled. A ratio claim marks its threshold instead of zero."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .stages import SPEED_CLAIM_MIN

    shown = [c for c in claims if c.get("measured")]
    colours = {"holds": "#1a7f37", "contradicted": "#cf222e", "does not hold": "#cf222e"}
    fig, axes = plt.subplots(len(shown), 1, figsize=(9, 0.62 * len(shown) + 0.6), squeeze=False)
    for ax, c in zip(axes[:, 0], shown):
        mean = c["measured"]["mean"]
        lo, hi = c["ci95"] if c.get("ci95") else (mean, mean)
        ref = SPEED_CLAIM_MIN if c.get("rule") == "ratio" else 0.0
        colour = colours.get(c.get("verdict"), "#6e7781")
        ax.axvline(ref, color="black", lw=0.8, ls="--" if ref else "-")
        ax.plot([lo, hi], [0, 0], color=colour, lw=3, solid_capstyle="butt")
        ax.plot([mean], [0], "o", color=colour, ms=6)
        span = max(hi, ref, mean) - min(lo, ref, mean) or 1.0
        ax.set_xlim(min(lo, ref, mean) - 0.08 * span, max(hi, ref, mean) + 0.08 * span)
        ax.set_yticks([])
        ax.tick_params(axis="x", labelsize=7, pad=1)
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
        label = textwrap.shorten(c["claim"], 70, placeholder="...")
        ax.set_ylabel(f"{label}\n[{c.get('unit') or 'difference'}; {c.get('verdict', '')}]", rotation=0,
                      ha="right", va="center", fontsize=7)
    fig.suptitle("Claims: paired difference, 95 % interval over seeds (zero marked)", fontsize=9)
    return save_figure(fig, path)
