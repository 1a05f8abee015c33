"""DDA: diffusion-driven test-time adaptation (Gao et al., CVPR 2023), the multi-step baseline of DiffAug-Ensemble.

The test image ``x_ref`` is diffused to ``t_start`` (about 500 of 1000) and run back to 0 with ``steps`` DDPM
ancestral steps (stride ``t_start / steps``, about 10) while a low-pass image guidance pulls every one-step
estimate towards the input's coarse structure:

    x_{t-1} = DDPM_step(x_t, x0_hat(x_t)) - w * grad_{x_t} || phi_D(x_ref) - phi_D(x0_hat(x_t)) ||

with ``phi_D`` = down-sample by ``D`` then up-sample (:func:`low_pass`: DDA's ``resize_right`` filter, but
constants kept at the borders), the gradient taken through the network. With ``norm="batch"``, the weight below and
the posterior variance this equals DDA's sampling loop run on the same network, noise and timesteps
(``tests/test_dda_reference.py``, a fixture of DDA's own outputs). Differences from DDA's code, all deliberate:

* ``norm="image"`` (default) takes the norm per image and sums, so an image's update does not depend on the others
  in its batch; DDA's code takes one norm over the whole batch (``norm="batch"``), which shrinks every image's
  step by about ``sqrt(batch size)`` and couples the images.
* ``w`` is given for 256x256x3 images (DDA's 6) and scaled by ``sqrt(C H W / (3 * 256 * 256))``: the gradient of a
  norm is a unit vector, so a fixed ``w`` would move an 8x8 image ~55x more per pixel than an ImageNet one.
* ``D`` defaults to 4 (DDA's ImageNet value) for images of 32 px and more, and to 2 below (8x8 -> 4x4 low-pass;
  D = 4 would keep 2x2 pixels of a digit).
* The model is called at ``t_start, t_start - stride, ..., stride`` on an image noised to ``t_start``. DDA's
  script (``--timestep_respacing 100 --N 50``) noises to 505 and calls the model at 494, 484, ..., 0 (strides of
  10 and 11, from guided-diffusion's respacing). The variance is the posterior ("fixed small") variance also for
  learned-variance networks (DDA's checkpoint learns it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .denoiser import Denoiser
from .errors import InputError
from .sampling import ddim_step, input_gradient, noise_sampler, timestep_pairs

REFERENCE_DIM = 3 * 256 * 256  # the image size DDA's guidance weight was set for


def default_downsample(image_size: int) -> int:
    """DDA's ``D`` for a square image side: 4 from 32 px up, 2 below."""
    return 4 if image_size >= 32 else 2


def low_pass(x: torch.Tensor, factor: int) -> torch.Tensor:
    """``phi_D``: down-sample by ``factor`` and up-sample back, with the Keys cubic kernel (a = -0.5), widened by
    ``factor`` when down-sampling (anti-aliased), as DDA's ``resize_right``; equal to it away from the borders
    (``tests/test_dda_reference.py``). At the borders the kernel's weights are renormalised over the pixels
    inside, so a constant image stays constant, where resize_right pads with zeros and darkens the border (a
    constant 0.5 drops to 0.18 at a 16-px corner): the pixels within about 3 ``factor`` of each side, a small
    part of a 256-px image, all of a 16-px one at ``factor`` 4. Differentiable."""
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, h // factor), max(1, w // factor)), mode="bicubic", antialias=True,
                          align_corners=False)
    return F.interpolate(small, size=(h, w), mode="bicubic", antialias=True, align_corners=False)


def dda_timesteps(t_start: int, steps: int) -> list[int]:
    """The model's times: ``steps`` evenly spaced integers from ``t_start`` down to ``t_start / steps``."""
    if not 1 <= steps <= t_start:
        raise InputError(f"DDA needs 1 <= steps (--dda-steps) <= t_start (--dda-t), got steps={steps}, "
                         f"t_start={t_start}")
    return [round(t_start * (steps - i) / steps) for i in range(steps)]


def guidance_gradient(denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor, ref_low: torch.Tensor, factor: int,
                      norm: str = "image") -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0_hat, grad)``: the clipped one-step estimate at ``(x_t, t)`` (model space) and the gradient w.r.t.
    ``x_t`` of ``|| ref_low - phi_D(x0_hat) ||`` (summed per-image norms, or one norm over the batch)."""
    def distance(x_in):
        x0_hat = denoiser.predict_x0(x_in, t, clip=True)
        diff = (ref_low - low_pass(x0_hat, factor)).flatten(1)
        return (diff.norm(dim=1).sum() if norm == "image" else diff.norm()), x0_hat

    grad, x0_hat = input_gradient(distance, x_t)
    return x0_hat, grad


def dda_adapt(
    denoiser: Denoiser,
    x: torch.Tensor,
    *,
    t_start: int = 500,
    steps: int = 50,
    guidance_scale: float = 6.0,
    downsample: int | None = None,
    norm: str = "image",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Project test images towards the diffusion model's training distribution (DDA).

    Args:
        denoiser: the diffusion model (used unconditionally: DDA has no labels at test time).
        x: images ``[N, C, H, W]`` in [0, 1].
        t_start: how far to diffuse (DDA: 500 of T = 1000; scale it with T).
        steps: reverse steps (DDA: 50).
        guidance_scale: ``w`` for a 256x256x3 image (DDA: 6), scaled to this image size (module docstring).
        downsample: ``D`` of the low-pass filter (None: :func:`default_downsample`).
        norm: ``"image"`` (per-image norm, default) or ``"batch"`` (one norm over the batch, as DDA's code).
        generator: source of the forward noise and of every ancestral step's noise.

    Returns:
        adapted images ``[N, C, H, W]`` in [0, 1] (detached: the loop differentiates internally).
    """
    denoiser.check_images(x)
    if not 0 < t_start < denoiser.num_timesteps:
        raise InputError(f"t_start must lie in (0, {denoiser.num_timesteps}), got {t_start}")
    if norm not in ("image", "batch"):
        raise InputError(f"norm must be 'image' or 'batch', got {norm!r}")
    if guidance_scale < 0:
        raise InputError(f"guidance_scale must be >= 0, got {guidance_scale}")
    n, c, h, w = x.shape
    factor = default_downsample(min(h, w)) if downsample is None else downsample
    if not 1 <= factor <= min(h, w):
        raise InputError(f"downsample factor D={factor} must lie in [1, {min(h, w)}] for {h}x{w} images")
    times = dda_timesteps(t_start, steps)
    if n == 0:
        return x.detach().clone()
    device = x.device
    weight = guidance_scale * math.sqrt(c * h * w / REFERENCE_DIM)
    randn = noise_sampler(x.shape, generator, device)
    ref = denoiser.encode(x.detach().float())
    ref_low = low_pass(ref, factor)
    x_t = denoiser.q_sample(ref, t_start, randn())
    for t, a_t, a_prev in timestep_pairs(denoiser.alpha_bar.to(device), times):
        x0_hat, grad = guidance_gradient(denoiser, x_t, torch.full((n,), t, device=device), ref_low, factor, norm)
        x_t = ddim_step(x_t.detach(), x0_hat, a_t, a_prev, 1.0, randn()) - weight * grad
    return denoiser.decode(x_t).clamp(0, 1).detach()
