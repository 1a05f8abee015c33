"""DiffAug: diffuse an image to a random time t, denoise it in one step.

Random parameters (t, noise) are drawn in :meth:`DiffAug.draw` and applied deterministically in
:meth:`DiffAug.apply` (kornia style), so an augmentation can be replayed. The one-step samplers are pure
functions of a :class:`~diffaug.denoiser.Denoiser` and model-space tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from . import schedule
from .denoiser import Denoiser
from .errors import InputError

SAMPLERS = ("tweedie", "dpm-solver-2")


def one_step_tweedie(den: Denoiser, x_t, t, y=None, *, cond_weight=None, validate: bool = True) -> torch.Tensor:
    """The x0 (Tweedie) estimate: one network evaluation, equal to one deterministic DDIM jump to t = 0."""
    return den.predict_x0(x_t, t, y, cond_weight=cond_weight, validate=validate)


def one_step_dpm_solver_2(den: Denoiser, x_t, t, y=None, *, cond_weight=None, t_end: int = 0,
                          validate: bool = True) -> torch.Tensor:
    """One second-order step of the probability-flow ODE from t to ``t_end``: DPM-Solver++(2S) (Lu et al. 2022).

    With ``alpha = sqrt(alpha_bar)``, ``sigma = sqrt(1 - alpha_bar)``, ``lambda = log(alpha / sigma)``,
    ``h = lambda_end - lambda_t`` and ``D(x, t)`` the network's x0 estimate, the intermediate time u is the
    discrete step nearest to ``lambda_t + h / 2`` and ``r1 = (lambda_u - lambda_t) / h``::

        x_u   = sigma_u / sigma_t x_t - alpha_u (e^{-r1 h} - 1) D(x_t, t)
        x_end = sigma_e / sigma_t x_t - alpha_e (e^{-h} - 1) (D(x_t, t) + (D(x_u, u) - D(x_t, t)) / (2 r1))

    Two network evaluations. This is the data-prediction form of DPM-Solver-2: the noise-prediction form
    multiplies its correction by ``sigma_t / alpha_t`` and diverges over one long step (on Gaussian data,
    t = 800 -> 0, it lands at 6.6 where the exact ODE solution is 0.30 and DDIM gives 0.01; this form gives 0.14).
    The ODE cannot reach the exact data point in one step (lambda is infinite there), so it ends at ``t_end``
    (default the first discrete step, ``alpha_bar[0] ~ 1``). Images already at ``t <= t_end`` are returned as is.
    """
    n = x_t.shape[0]
    t = den._timesteps(t, n, x_t.device, validate)
    ab = den.alpha_bar.to(x_t.device).double()
    lam_all = schedule.log_snr(ab)
    end = torch.full_like(t, t_end)
    lam_t, lam_e = lam_all[t], lam_all[end]
    h = lam_e - lam_t
    # intermediate step: nearest in lambda to the midpoint, strictly between end and t where possible
    u = (lam_all[None, :] - (lam_t + h / 2)[:, None]).abs().argmin(dim=1)
    wide = t - end >= 2
    u = torch.minimum(torch.maximum(u, torch.where(wide, end + 1, end)), torch.where(wide, t - 1, end))
    moving = h > 0
    r1 = torch.where(moving, (lam_all[u] - lam_t) / torch.where(moving, h, torch.ones_like(h)), torch.full_like(h, 0.5))

    def view(v):
        return v.float().reshape(-1, *([1] * (x_t.ndim - 1)))

    alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    x_t = x_t.float()
    d_t = den.predict_x0(x_t, t, y, cond_weight=cond_weight, validate=validate)
    x_u = view(sigma[u] / sigma[t]) * x_t - view(alpha[u] * torch.expm1(-r1 * h)) * d_t
    d_u = den.predict_x0(x_u, u, y, cond_weight=cond_weight, validate=False)
    x_end = view(sigma[end] / sigma[t]) * x_t - view(alpha[end] * torch.expm1(-h)) * (d_t + (d_u - d_t) / view(2 * r1))
    return torch.where(view(moving) > 0, x_end, x_t)


def diffuse_denoise(den: Denoiser, x: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor,
                    y: torch.Tensor | None = None, *, sampler: str = "tweedie", cond_weight: float = 0.0,
                    clip: bool = True, validate: bool = True) -> torch.Tensor:
    """The DiffAug view: diffuse ``x`` to timesteps ``t`` with ``noise`` and denoise in one step.

    ``x_t = sqrt(alpha_bar_t) encode(x) + sqrt(1 - alpha_bar_t) noise``, then the one-step estimate of x0
    (``sampler``: ``tweedie`` or ``dpm-solver-2``), clipped to [-1, 1] with ``clip``, decoded. Deterministic: every
    random choice is in ``t`` and ``noise``. :class:`DiffAug`, DiffAug-Ensemble and the study's figures use it.

    Args:
        den: the denoiser (used with ``y`` only when it is class-conditional).
        x: images ``[N, C, H, W]`` in [0, 1].
        t: timesteps, an int or a LongTensor ``[N]``.
        noise: model-space standard normal noise like ``x``.
        y: class labels ``[N]``, needed when ``cond_weight > 0``.
        sampler: the one-step sampler.
        cond_weight: weight of the conditional prediction of a conditional denoiser (0: unconditional).
        clip: clip the estimate to the data range.
        validate: check the values of ``x`` (range, NaN) and of a tensor ``t`` and ``y`` (host-device syncs on a
            GPU); type, shape, channels, size and device are always checked.

    Returns:
        ``[N, C, H, W]`` in [0, 1] (with ``clip``), the dtype of ``x``; gradients flow to ``x``.
    """
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
    den.check_images(x, values=validate)
    den.check_device(x)
    if noise.shape != x.shape:  # shapes are host metadata: no sync
        raise InputError(f"noise {tuple(noise.shape)} must have the shape of x {tuple(x.shape)}; draw it with "
                         "torch.randn_like(x)")
    t = den._timesteps(t, x.shape[0], x.device, validate)
    cond_weight = cond_weight if den.is_conditional else None
    if den.is_conditional and cond_weight > 0 and y is None:
        raise InputError("conditional DiffAug (cond_weight > 0) needs class labels y; pass y=labels")
    if y is not None and den.is_conditional:
        y = den._labels(y, x.shape[0], x.device, validate)
    x_t = schedule.q_sample(den.encode(x.float()), t, noise, den.alpha_bar)
    step = one_step_tweedie if sampler == "tweedie" else one_step_dpm_solver_2
    x0_hat = step(den, x_t, t, y if den.is_conditional else None, cond_weight=cond_weight, validate=False)
    if clip:
        x0_hat = x0_hat.clamp(-1, 1)
    return den.decode(x0_hat).to(x.dtype)


class DiffAug(nn.Module):
    """The DiffAug augmentation as a ``torch.nn.Module`` that holds a frozen denoiser.

    For each image: draw ``t`` uniformly from ``t_range`` (inclusive), draw fresh Gaussian noise, form
    ``x_t``, denoise in one step, clip to the data range, return to [0, 1].

    Args:
        denoiser: the :class:`Denoiser`; it is frozen (``requires_grad_(False)``) and kept in eval mode.
        t_range: ``(t_min, t_max)`` integer timesteps, inclusive, within ``[0, T)``. Default: the whole schedule.
        fraction_range: the same range as fractions of the schedule in [0, 1] (schedule-independent).
        sigma_range: the same range as noise levels ``sigma = sqrt((1 - alpha_bar) / alpha_bar)``.
        sampler: ``"tweedie"`` (one network evaluation, the paper's default) or ``"dpm-solver-2"`` (two).
        cond_weight: lambda of conditional DiffAug for a class-conditional denoiser: the network output is
            ``(1 - lambda) * out(x_t, t, null) + lambda * out(x_t, t, y)``; 0 = unconditional (default),
            1 = conditional. Needs labels ``y`` when > 0.
        clip: clamp the estimate to the data range (on by default for augmentation).
        validate: check the values of the images (range, NaN) and labels on every call: one host-device
            synchronisation each. False makes a call free of syncs (for trusted data in a GPU loop; pass a
            generator on the same GPU, since a CPU generator's draws are copied over); shapes, dtypes and
            channels are always checked.

    Shapes: ``x`` is ``[N, C, H, W]`` float in [0, 1]; the output has the same shape and dtype.
    Gradients flow to ``x`` (not into the denoiser); under ``torch.no_grad()`` no graph is kept.

    The denoiser is held as a tool, like a kornia augmentation's constants: ``.to(device)`` / ``.cuda()`` /
    ``.half()`` move it (its schedule stays float32), but it is not among ``parameters()`` or ``state_dict()``.
    So a model that holds a DiffAug neither saves the denoiser's weights in its checkpoints, nor hands them to an
    optimizer, nor unfreezes them with ``requires_grad_(True)``, and DDP does not broadcast them.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        t_range: tuple[int, int] | None = None,
        *,
        fraction_range: tuple[float, float] | None = None,
        sigma_range: tuple[float, float] | None = None,
        sampler: str = "tweedie",
        cond_weight: float = 0.0,
        clip: bool = True,
        validate: bool = True,
    ):
        super().__init__()
        if not isinstance(denoiser, Denoiser):
            raise InputError(f"DiffAug needs a diffaug.Denoiser, got {type(denoiser).__name__}; see load_denoiser")
        if sampler not in SAMPLERS:
            raise InputError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
        if not 0 <= cond_weight <= 1:
            raise InputError(f"cond_weight must lie in [0, 1], got {cond_weight}")
        if cond_weight > 0 and not denoiser.is_conditional:
            raise InputError("cond_weight > 0 needs a class-conditional denoiser; use cond_weight=0")
        if cond_weight < 1 and denoiser.is_conditional and denoiser.null_class is None:
            raise InputError("this conditional denoiser has no null label, so it cannot run unconditionally; "
                             "set cond_weight=1")
        self.denoiser = denoiser.requires_grad_(False).eval()  # held, not a submodule: see the docstring
        self.t_min, self.t_max = resolve_t_range(denoiser, t_range, fraction_range, sigma_range)
        self.sampler = sampler
        self.cond_weight = float(cond_weight)
        self.clip = clip
        self.validate = validate

    def __setattr__(self, name, value):
        if name == "denoiser":  # held, not a submodule, also when replaced later
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

    def train(self, mode: bool = True) -> "DiffAug":
        super().train(mode)
        self.denoiser.eval()  # the frozen denoiser never switches to training behaviour
        return self

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.denoiser._apply(fn, recurse)  # .to() / .cuda() / .half() move the denoiser it holds
        return self

    @property
    def needs_labels(self) -> bool:
        """Whether a call needs class labels ``y`` (conditional DiffAug: ``cond_weight > 0``)."""
        return self.cond_weight > 0

    def extra_repr(self) -> str:
        return f"t_range=({self.t_min}, {self.t_max}), sampler={self.sampler!r}, cond_weight={self.cond_weight}"

    def draw(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Random parameters for a batch like ``x``: timesteps ``[N]`` and model-space noise like ``x``."""
        device = generator.device if generator is not None else x.device
        t = torch.randint(self.t_min, self.t_max + 1, (x.shape[0],), generator=generator, device=device)
        noise = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32)
        return t.to(x.device), noise.to(x.device)

    def apply(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, y: torch.Tensor | None = None):
        """Deterministic part: diffuse ``x`` (in [0, 1]) to ``t`` with ``noise`` and denoise in one step
        (:func:`diffuse_denoise` with this augmentation's settings)."""
        return diffuse_denoise(self.denoiser, x, t, noise, y, sampler=self.sampler, cond_weight=self.cond_weight,
                               clip=self.clip, validate=self.validate)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, *, generator: torch.Generator | None = None,
                return_t: bool = False):
        """Augment a batch.

        Args:
            x: images ``[N, C, H, W]`` in [0, 1].
            y: class labels ``[N]`` (used only by conditional DiffAug, ``cond_weight > 0``).
            generator: source of randomness for t and the noise (None: the global RNG).
            return_t: also return the drawn timesteps ``[N]``.
        """
        self.denoiser.check_images(x, values=self.validate)
        self.denoiser.check_device(x)
        if y is not None:  # checked before any draw (the range check only with validate)
            y = self.denoiser._labels(y, x.shape[0], x.device, self.validate)
        t, noise = self.draw(x, generator)
        out = x.clone() if x.shape[0] == 0 else diffuse_denoise(
            self.denoiser, x, t, noise, y, sampler=self.sampler, cond_weight=self.cond_weight, clip=self.clip,
            validate=False)  # x and y were checked above; t was drawn in range
        return (out, t) if return_t else out


class ResizedDiffAug(nn.Module):
    """DiffAug at the denoiser's resolution for images of another size: each batch is resized (antialiased
    bilinear, torchvision) to ``size`` x ``size``, augmented by ``diffaug`` and resized back to its own size.

    Args:
        diffaug: the :class:`DiffAug` (its denoiser takes ``size`` x ``size`` images).
        size: the side length the denoiser runs at.
    """

    def __init__(self, diffaug: DiffAug, size: int):
        super().__init__()
        self.diffaug, self.size = diffaug, int(size)

    @property
    def needs_labels(self) -> bool:
        return self.diffaug.needs_labels

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, *, generator: torch.Generator | None = None):
        from torchvision.transforms.v2.functional import resize

        h, w = x.shape[-2:]
        out = self.diffaug(resize(x, [self.size, self.size], antialias=True).clamp(0, 1), y, generator=generator)
        return resize(out, [h, w], antialias=True).clamp(0, 1)


def denoiser_at(den: Denoiser, crop: int, denoiser_size: int | None = None) -> tuple[Denoiser, int | None]:
    """The denoiser to augment ``crop`` x ``crop`` images with, and the size to resize them to around it (None:
    none). Without ``denoiser_size`` a convolutional denoiser runs at the crop size when its network allows
    (:meth:`Denoiser.at_size`); with it, images are resized to ``denoiser_size`` and back
    (:class:`ResizedDiffAug`). A size the network cannot take raises :class:`InputError` (one line)."""
    if denoiser_size is None:
        return den.at_size(crop), None
    if isinstance(denoiser_size, bool) or not isinstance(denoiser_size, int) or denoiser_size < 1:
        raise InputError(f"--denoiser-size must be a whole number >= 1, got {denoiser_size!r}")
    return den.at_size(denoiser_size), (denoiser_size if denoiser_size != crop else None)


def resolve_t_range(den: Denoiser, t_range=None, fraction_range=None, sigma_range=None) -> tuple[int, int]:
    """Turn one of the three ways of naming a time range into inclusive integer bounds within ``[0, T)``."""
    given = [r for r in (t_range, fraction_range, sigma_range) if r is not None]
    if len(given) > 1:
        raise InputError("give at most one of t_range, fraction_range, sigma_range")
    T = den.num_timesteps
    if not given:
        return 0, T - 1
    rng = given[0]
    if len(rng) != 2:
        raise InputError(f"a range needs two bounds (low, high), got {rng!r}")
    if t_range is not None:
        lo, hi = rng
        if int(lo) != lo or int(hi) != hi:
            raise InputError(f"t_range needs integer timesteps, got {rng!r}; use fraction_range for fractions of T")
        lo, hi = int(lo), int(hi)
    elif fraction_range is not None:
        lo, hi = (int(den.t_from_fraction(f)) for f in rng)
    else:
        top = float(den.sigma(T - 1))
        if any(not 0 <= s <= top * 1.01 for s in rng):
            raise InputError(f"sigma_range must lie within the schedule's noise levels [0, {top:.4g}], got {rng!r}")
        lo, hi = (int(den.t_from_sigma(s)) for s in rng)
    if not 0 <= lo <= hi < T:
        raise InputError(f"t_range must satisfy 0 <= low <= high < T = {T}, got ({lo}, {hi})")
    return lo, hi
