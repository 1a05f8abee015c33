"""DiffAug-Ensemble (DE): average the classifier's softmax over DiffAug views at several fixed times.

Member t = 0 means "the image itself" (no noise, no denoiser). Every other member is one DiffAug view at that t
with its own noise draw. All members are folded into one batch, so the denoiser and the classifier each run once
per call (in chunks of ``batch_size`` images if given).
"""

from __future__ import annotations

import torch
from torch import nn

from .augment import diffuse_denoise
from .denoiser import Denoiser
from .errors import InputError

DEFAULT_MEMBERS = tuple(range(0, 451, 50))  # the paper: t in {0, 50, ..., 450}


def ensemble_members(step: int = 50, t_max: int = 450) -> tuple[int, ...]:
    """``(0, step, 2 step, ..., <= t_max)``: the paper's member sets (step 25, 50 or 75)."""
    if step < 1 or t_max < 0:
        raise InputError(f"DE member step must be >= 1 (--de-step) and t_max >= 0, got step={step}, t_max={t_max}")
    return tuple(range(0, t_max + 1, step))


def ensemble_views(
    denoiser: Denoiser,
    x: torch.Tensor,
    members=DEFAULT_MEMBERS,
    *,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    sampler: str = "tweedie",
    validate: bool = True,
) -> torch.Tensor:
    """The DiffAug views of DE: ``[M, N, C, H, W]`` in [0, 1], member ``k`` at time ``members[k]`` (0: ``x``).

    One noise draw per member and image. Separate from the classifier so that several classifiers can be
    compared on the same views. ``validate=False`` skips the value check of ``x`` (the call's only
    host-device sync; see :class:`~diffaug.augment.DiffAug`).
    """
    members = [int(t) for t in members]
    if not members:
        raise InputError("members must name at least one time")
    bad = [t for t in members if not 0 <= t < denoiser.num_timesteps]
    if bad:
        raise InputError(f"ensemble members {bad} lie outside [0, {denoiser.num_timesteps})")
    if batch_size is not None and batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if validate:
        denoiser.check_images(x)
    n = x.shape[0]
    if n == 0:  # an empty batch (the last shard of a split evaluation, say): empty views
        return x.unsqueeze(0).expand(len(members), *x.shape).clone()
    noisy = [t for t in members if t > 0]
    views = {}
    if noisy:
        rep = x.repeat(len(noisy), 1, 1, 1)  # member-major: rows k*n .. (k+1)*n - 1 are member k
        t = torch.cat([torch.full((n,), t, dtype=torch.long, device=x.device) for t in noisy])  # no host copy
        gen_device = generator.device if generator is not None else x.device
        noise = torch.randn(rep.shape, generator=generator, device=gen_device).to(x.device)
        chunk = batch_size or rep.shape[0]
        out = torch.cat([diffuse_denoise(denoiser, rep[i : i + chunk], t[i : i + chunk], noise[i : i + chunk],
                                         sampler=sampler, validate=False) for i in range(0, rep.shape[0], chunk)])
        views = dict(zip(noisy, out.reshape(len(noisy), *x.shape)))
    return torch.stack([views[t] if t > 0 else x.to(views[noisy[0]].dtype if noisy else x.dtype)
                        for t in members])


def ensemble_probs(classifier: nn.Module, views: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Softmax of ``classifier`` on views ``[M, N, C, H, W]`` -> ``[M, N, K]`` float32 (mean over M: DE)."""
    if batch_size is not None and batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    flat = views.flatten(0, 1)
    chunk = batch_size or max(1, flat.shape[0])
    logits = torch.cat([classifier(flat[i : i + chunk]) for i in range(0, flat.shape[0], chunk)]) if len(flat) \
        else classifier(flat)  # an empty batch: the classifier's own [0, K]
    return logits.float().softmax(dim=1).reshape(views.shape[0], views.shape[1], logits.shape[1])


def diffaug_ensemble(
    classifier: nn.Module,
    denoiser: Denoiser,
    x: torch.Tensor,
    *,
    members=DEFAULT_MEMBERS,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    sampler: str = "tweedie",
    validate: bool = True,
) -> torch.Tensor:
    """DE prediction: mean softmax over the members' views.

    Args:
        classifier: images ``[N, C, H, W]`` in [0, 1] -> logits ``[N, K]``.
        denoiser: the diffusion model for the views.
        x: images ``[N, C, H, W]`` in [0, 1].
        members: integer times in ``[0, T)``; 0 is the image itself.
        generator: noise source for the views.
        batch_size: at most this many images per network call (None: all ``N * len(members)`` at once).
        validate: check the values of ``x`` (one host-device sync); False for trusted data in a GPU loop.

    Returns:
        probabilities ``[N, K]`` (float32). A graph is built only when ``x`` requires grad (an attack through
        DE, say), not because the classifier's parameters do; for gradients w.r.t. the classifier's parameters
        call :func:`ensemble_views` and :func:`ensemble_probs`, which follow autograd's usual rules.
    """
    with torch.set_grad_enabled(torch.is_grad_enabled() and x.requires_grad):
        views = ensemble_views(denoiser, x, members, generator=generator, batch_size=batch_size, sampler=sampler,
                               validate=validate)
        return ensemble_probs(classifier, views, batch_size).mean(dim=0)
