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


def ddim_step(x_t, x0_hat, a_t, a_prev, eta: float, noise: torch.Tensor) -> torch.Tensor:
    """One generalised DDIM update from ``alpha_bar = a_t`` to ``a_prev`` given the x0 estimate (model space).

    ``eta = 1`` is the DDPM ancestral step with the posterior ("fixed small") variance, ``eta = 0`` deterministic
    DDIM; ``a_prev = 1`` returns ``x0_hat``.
    """
    eps = (x_t - a_t.sqrt() * x0_hat) / (1 - a_t).sqrt()
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()
    return a_prev.sqrt() * x0_hat + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps + sigma * noise


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
        z = torch.randn(x.shape, generator=generator, device=gen_device).to(device)
        x = ddim_step(x, x0, a_t, a_prev, eta, z)
    return denoiser.decode(x0).clamp(0, 1)
