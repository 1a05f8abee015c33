"""Noise schedules and the pure math of discrete-time (DDPM-family) diffusion.

Everything here is a small function of tensors: no networks, no I/O. Conventions:

* ``alpha_bar``: float tensor ``[T]``, the cumulative product of ``1 - beta``; ``x_t = sqrt(alpha_bar[t]) x0
  + sqrt(1 - alpha_bar[t]) eps`` for integer ``t`` in ``[0, T)``.
* ``sigma``: the schedule-independent noise level ``sqrt((1 - alpha_bar) / alpha_bar)`` (variance-exploding
  view, as in k-diffusion / EDM); it grows with ``t``.
* Images are in the model's space (usually [-1, 1]); see :mod:`diffaug.denoiser` for the conversion.
"""

from __future__ import annotations

import math

import torch

from .errors import InputError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def linear_alpha_bar(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear beta schedule (Ho et al. 2020), rescaled to ``num_timesteps`` as in improved-DDPM.

    For ``num_timesteps=1000`` this is exactly ``betas = linspace(1e-4, 0.02, 1000)``; for other lengths the
    end points are scaled by ``1000 / num_timesteps`` so the process ends at the same noise level. Betas are
    clipped at 0.999 (as the cosine schedule's), which only matters below 21 steps, where the scaled end point
    would exceed 1 and make ``alpha_bar`` negative.
    """
    _check_num_timesteps(num_timesteps)
    scale = 1000.0 / num_timesteps
    betas = torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64).clamp(max=0.999)
    return torch.cumprod(1.0 - betas, dim=0).float()


def cosine_alpha_bar(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Improved-DDPM's cosine schedule (Nichol & Dhariwal 2021): ``f(t) = cos^2(((t/T + s) / (1 + s)) pi/2)``.

    Betas ``1 - f(t+1)/f(t)`` are clipped at ``max_beta``, as in the reference implementation.
    """
    _check_num_timesteps(num_timesteps)
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    return torch.cumprod(1.0 - betas, dim=0).float()


NAMED_SCHEDULES = ("linear", "cosine")  # OpenAI's guided- / improved-diffusion's noise_schedule flag


def named_alpha_bar(name: str, num_timesteps: int) -> torch.Tensor:
    """``alpha_bar`` of OpenAI's ``noise_schedule`` flag: ``linear`` (:func:`linear_alpha_bar`) or ``cosine``
    (:func:`cosine_alpha_bar`); a one-line :class:`InputError` for any other name."""
    if name not in NAMED_SCHEDULES:
        raise InputError(f"unknown noise_schedule {name!r}; use linear or cosine")
    return (cosine_alpha_bar if name == "cosine" else linear_alpha_bar)(num_timesteps)


def alpha_bar_from_scheduler(scheduler) -> torch.Tensor:
    """The ``alphas_cumprod`` of a diffusers DDPM-family scheduler, copied into a float32 tensor of our own."""
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        raise TypeError(
            f"{type(scheduler).__name__} has no alphas_cumprod; pass a DDPM-family scheduler "
            "(DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, ...)"
        )
    return torch.as_tensor(alphas_cumprod).detach().to(dtype=torch.float32, device="cpu").clone()


def _check_num_timesteps(num_timesteps: int) -> None:
    if int(num_timesteps) != num_timesteps or num_timesteps < 2:
        raise InputError(f"num_timesteps must be an integer >= 2, got {num_timesteps!r}")


def _gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values[t]`` reshaped to broadcast against ``like`` (N x ...), on its device and dtype."""
    out = values.to(like.device)[t.to(like.device)]
    return out.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Forward diffusion: ``x_t = sqrt(alpha_bar[t]) x0 + sqrt(1 - alpha_bar[t]) noise``.

    Args:
        x0: clean images in model space, ``[N, C, H, W]``.
        t: integer timesteps, ``[N]``.
        noise: standard Gaussian noise, same shape as ``x0``.
        alpha_bar: the schedule, ``[T]``.
    """
    a = _gather(alpha_bar, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def x0_from_model_output(
    model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Tweedie / one-step estimate of ``x0`` from a network's output.

    ``alpha_bar_t`` broadcasts against ``x_t`` (e.g. ``[N, 1, 1, 1]``). With ``a = alpha_bar_t``:

    * epsilon: ``x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)``
    * v_prediction (Salimans & Ho 2022): ``x0 = sqrt(a) x_t - sqrt(1 - a) v``
    * sample: the output is ``x0`` itself.
    """
    if prediction_type == "epsilon":
        return (x_t - (1 - alpha_bar_t).sqrt() * model_output) / alpha_bar_t.sqrt()
    if prediction_type == "v_prediction":
        return alpha_bar_t.sqrt() * x_t - (1 - alpha_bar_t).sqrt() * model_output
    if prediction_type == "sample":
        return model_output
    raise InputError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def eps_from_x0(x0: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """The noise implied by an ``x0`` estimate: ``eps = (x_t - sqrt(a) x0) / sqrt(1 - a)``."""
    return (x_t - alpha_bar_t.sqrt() * x0) / (1 - alpha_bar_t).sqrt()


def sigma_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Noise level ``sigma = sqrt((1 - alpha_bar) / alpha_bar)`` (schedule-independent)."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def sigma_to_t(sigma: float | torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The integer timestep whose noise level is nearest to ``sigma`` (in log space). Returns a LongTensor."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    if (sigma <= 0).any() or not torch.isfinite(sigma).all():
        raise InputError(f"sigma must be positive and finite, got {sigma.tolist()}")
    log_sigmas = sigma_from_alpha_bar(alpha_bar.double()).log()
    dist = (sigma.log().reshape(-1, 1) - log_sigmas.reshape(1, -1)).abs()
    return dist.argmin(dim=1).reshape(sigma.shape)


def fraction_to_t(fraction: float | torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """Map a fraction of the schedule in [0, 1] to an integer t in [0, T): ``round(fraction * (T - 1))``."""
    fraction = torch.as_tensor(fraction, dtype=torch.float64)
    if (fraction < 0).any() or (fraction > 1).any():
        raise InputError(f"fraction of T must lie in [0, 1], got {fraction.tolist()}")
    return torch.round(fraction * (num_timesteps - 1)).long()


def t_to_fraction(t: int | torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """Inverse of :func:`fraction_to_t`: ``t / (T - 1)``."""
    return torch.as_tensor(t, dtype=torch.float64) / (num_timesteps - 1)


def log_snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """``lambda = log(alpha / sigma)`` with ``alpha = sqrt(alpha_bar)``, ``sigma = sqrt(1 - alpha_bar)`` (DPM-Solver)."""
    return 0.5 * (alpha_bar.log() - torch.log1p(-alpha_bar))


def eps_from_model_output(
    model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The noise estimate ``eps`` from a network's output (the counterpart of :func:`x0_from_model_output`)."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha_bar_t.sqrt() * model_output + (1 - alpha_bar_t).sqrt() * x_t
    if prediction_type == "sample":
        return eps_from_x0(model_output, x_t, alpha_bar_t)
    raise InputError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
