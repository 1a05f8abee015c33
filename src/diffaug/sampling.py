"""Multi-step sampling from a :class:`~diffaug.denoiser.Denoiser` (generalised DDIM; eta = 1 is ancestral), and the
pieces every reverse loop here shares (plain and guided sampling, DDA, perceptually aligned gradients):
:func:`timestep_pairs`, :func:`noise_sampler` and :func:`input_gradient`, in the style of k-diffusion's samplers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from . import schedule
from .denoiser import Denoiser
from .errors import InputError


def noise_sampler(shape, generator: torch.Generator | None, device) -> Callable[[], torch.Tensor]:
    """A function drawing standard normal noise of ``shape`` on ``device`` from ``generator`` (which may live on
    another device: the draw is made where the generator is and moved)."""
    gen_device = generator.device if generator is not None else device

    def draw() -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=gen_device).to(device)
    return draw


def timestep_pairs(alpha_bar: torch.Tensor, timesteps: Sequence[int]
                   ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(t, alpha_bar[t], alpha_bar[next t])`` along a decreasing timestep list; after the last step the next
    ``alpha_bar`` is 1 (clean images)."""
    for i, t in enumerate(timesteps):
        a_prev = alpha_bar[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.ones((), device=alpha_bar.device)
        yield t, alpha_bar[t], a_prev


def posterior_variance(a_t: torch.Tensor, a_prev: torch.Tensor) -> torch.Tensor:
    """The DDPM posterior ("fixed small") variance of the step from ``alpha_bar = a_t`` to ``a_prev``:
    ``beta (1 - a_prev) / (1 - a_t)`` with ``beta = 1 - a_t / a_prev`` (0 at the last step, ``a_prev = 1``)."""
    return (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)


def learned_variance(v: torch.Tensor, a_t: torch.Tensor, a_prev: torch.Tensor,
                     floor: torch.Tensor) -> torch.Tensor:
    """Improved-DDPM's learned-range variance of the step from ``a_t`` to ``a_prev`` (Nichol & Dhariwal 2021,
    eq. 15, as guided-diffusion computes it on a respaced schedule): ``exp(f log beta + (1 - f) log
    posterior)``, ``f = (v + 1) / 2``. ``floor`` replaces a posterior variance of 0 (the last step): the
    posterior variance of the step before it, as guided-diffusion's ``posterior_log_variance_clipped``."""
    post = posterior_variance(a_t, a_prev)
    min_log = torch.log(torch.where(post > 0, post, floor))
    max_log = torch.log(1 - a_t / a_prev)
    frac = (v + 1) / 2
    return torch.exp(frac * max_log + (1 - frac) * min_log)


def input_gradient(fn: Callable, x: torch.Tensor):
    """``(grad, aux)``: the gradient w.r.t. ``x`` of ``fn(x)``'s scalar, where ``fn`` returns a scalar or
    ``(scalar, aux)`` (aux is returned detached; None when there is none). Gradients are enabled inside, so it
    works under ``torch.no_grad`` too; ``x`` itself is not modified."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        out = fn(x_in)
        value, aux = out if isinstance(out, tuple) else (out, None)
        grad = torch.autograd.grad(value, x_in)[0]
    return grad, (aux.detach() if aux is not None else None)


def sampling_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` integer timesteps from ``T - 1`` down to 0, evenly spaced, without repeats."""
    if not 1 <= steps <= num_timesteps:
        raise InputError(f"sampling steps must lie in [1, {num_timesteps}] (the model's timesteps), got {steps}")
    ts = torch.linspace(num_timesteps - 1, 0, steps).round().long().tolist()
    return sorted(set(ts), reverse=True)


def ddim_step(x_t, x0_hat, a_t, a_prev, eta: float, noise: torch.Tensor) -> torch.Tensor:
    """One generalised DDIM update from ``alpha_bar = a_t`` to ``a_prev`` given the x0 estimate (model space).

    ``eta = 1`` is the DDPM ancestral step with the posterior ("fixed small") variance, ``eta = 0`` deterministic
    DDIM; ``a_prev = 1`` returns ``x0_hat``.
    """
    eps = schedule.eps_from_x0(x0_hat, x_t, a_t)
    sigma = eta * posterior_variance(a_t, a_prev).clamp(min=0).sqrt()
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
    randn = noise_sampler((n, denoiser.channels, H, W), generator, device)
    x = randn()
    x0 = x
    for t, a_t, a_prev in timestep_pairs(denoiser.alpha_bar.to(device),
                                         sampling_timesteps(denoiser.num_timesteps, steps)):
        x0 = denoiser.predict_x0(x, torch.full((n,), t, device=device), y, cond_weight=cond_weight, clip=True)
        x = ddim_step(x, x0, a_t, a_prev, eta, randn())
    return denoiser.decode(x0).clamp(0, 1)
