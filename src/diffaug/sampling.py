"""Multi-step sampling from a :class:`~diffaug.denoiser.Denoiser` (generalised DDIM; eta = 1 is ancestral)."""

from __future__ import annotations

import torch

from .denoiser import Denoiser


def sampling_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` integer timesteps from ``T - 1`` down to 0, evenly spaced, without repeats."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must lie in [1, {num_timesteps}], got {steps}")
    ts = torch.linspace(num_timesteps - 1, 0, steps).round().long().tolist()
    return sorted(set(ts), reverse=True)


def ddim_sample(
    denoiser: Denoiser,
    n: int,
    y: torch.Tensor | None = None,
    *,
    steps: int = 100,
    eta: float = 1.0,
    cond_weight: float | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw ``n`` images with DDIM (Song et al. 2021); ``eta=0`` deterministic, ``eta=1`` DDPM-like.

    Returns images in [0, 1], ``[n, C, H, W]`` on ``device`` (default: the denoiser's).
    """
    device = torch.device(device) if device is not None else denoiser.alpha_bar.device
    H, W = denoiser.image_size
    gen_device = generator.device if generator is not None else device
    x = torch.randn((n, denoiser.channels, H, W), generator=generator, device=gen_device).to(device)
    ts = sampling_timesteps(denoiser.num_timesteps, steps)
    alpha_bar = denoiser.alpha_bar.to(device)
    x0 = x
    for i, t in enumerate(ts):
        a_t = alpha_bar[t]
        a_prev = alpha_bar[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), device=device)
        x0 = denoiser.predict_x0(x, torch.full((n,), t, device=device), y, cond_weight=cond_weight, clip=True)
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()
        z = torch.randn(x.shape, generator=generator, device=gen_device).to(device)
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps + sigma * z
    return denoiser.decode(x0).clamp(0, 1)
