"""Randomized smoothing (Cohen et al. 2019) and diffusion denoised smoothing (Carlini et al. 2023, "DDS").

The smoothed classifier is ``g(x) = argmax_c P(f(x + sigma * eps) = c)`` with the noise added to the image in
[0, 1] pixel space, so radii are in pixel space (L2). With a denoiser, ``f = classifier(denoise_t*(.))``:

* the pixel noise ``sigma`` is ``2 sigma`` in the model's [-1, 1] space, so ``t*`` is the step whose
  ``sqrt((1 - alpha_bar) / alpha_bar)`` is nearest to ``2 sigma`` (nearest in log sigma);
* the noisy image is scaled by ``sqrt(alpha_bar[t*])``, which makes it a sample of ``x_t*`` (exactly so when the
  two noise levels match), and denoised in one shot (the x0 estimate, clipped).

The denoiser is part of the base classifier, and the Gaussian noise added is always exactly ``sigma``, so the
certificate ``sigma * inv_Phi(pA)`` is valid whatever ``t*`` is; rounding ``t*`` only changes how well the
denoiser is matched to the noise (``Smooth.dds_mismatch`` reports it).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from scipy.special import ndtr, ndtri
from scipy.stats import binomtest, norm
from torch import nn

from . import sequential
from .errors import InputError, check_image_values
from .sequential import FUTILITY, lower_confidence_bound, look_schedule, sequence_bounds

ABSTAIN = -1


def check_sampling_args(batch_size: int, alpha: float | None = None, **counts: int) -> None:
    """One-line errors for bad ``batch_size``, ``alpha`` and draw counts (``n0=``, ``n=``)."""
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    for name, value in counts.items():
        if value < 1:
            raise InputError(f"{name} must be >= 1, got {value}")
    if alpha is not None and not 0 < alpha < 1:
        raise InputError(f"alpha must lie in (0, 1), got {alpha}")


def check_sequential_args(n0: int, max_n: int, radii=None, radius_tol: float | None = None,
                          futility: float = FUTILITY) -> None:
    """One-line errors for ``certify_sequential``'s own settings (``max_n`` vs ``n0``, the radius grid, the
    tolerance, the futility level); ``check_sampling_args`` covers the rest."""
    if max_n < n0:
        raise InputError(f"max_n must be >= n0 ({n0}), got {max_n}; raise max_n (--max-n) or lower n0 (--n0)")
    if radii is not None:
        radii = list(radii)
        if not radii or any(not math.isfinite(r) or r < 0 for r in radii):
            raise InputError(f"radii must be a non-empty list of finite radii >= 0, got {radii}")
        if any(b <= a for a, b in zip(radii, radii[1:])):
            raise InputError(f"radii must be strictly increasing, got {radii}")
    if radius_tol is not None and not (radius_tol > 0 and math.isfinite(radius_tol)):
        raise InputError(f"radius_tol must be a positive number, got {radius_tol}")
    if not 0 <= futility < 1:
        raise InputError(f"futility must lie in [0, 1) (0 never stops a radius early), got {futility}")


def cohen_radius(c_hat: int, n_a: int, n: int, alpha: float, sigma: float) -> tuple[int, float]:
    """CERTIFY's decision from its counts: ``(c_hat, sigma * inv_Phi(pA_lower))`` with the one-sided (1 - alpha)
    Clopper-Pearson lower bound of ``n_a`` votes in ``n``, or ``(ABSTAIN, 0.0)`` when it is below 1/2."""
    p_a = lower_confidence_bound(n_a, n, alpha)
    if p_a < 0.5:
        return ABSTAIN, 0.0
    return c_hat, sigma * float(norm.ppf(p_a))


def continuous_test(draw, alpha: float, looks: tuple[int, ...], tol: float) -> tuple[float, int]:
    """The continuous rule of ``certify_sequential`` on a stream of votes (``draw(m)``: votes for the selected
    class among ``m`` new draws); returns ``(lower bound on pA, trials)``. ``tol`` is in units of sigma."""
    max_n = looks[-1]
    successes = trials = 0
    lower, upper = 0.0, 1.0
    for look in looks:
        successes += draw(look - trials)
        trials = look
        lo, hi = sequence_bounds(successes, trials, alpha, max_n)
        lower, upper = max(lower, lo), min(upper, hi)  # the intersection over looks is still valid
        reachable = max(lower, sequence_bounds(successes + max_n - trials, max_n, alpha, max_n)[0])
        if upper <= 0.5 or reachable <= 0.5:
            break
        if lower > 0.5 and min(ndtri(successes / trials), ndtri(reachable)) - ndtri(lower) <= tol:
            break
    return lower, trials


@dataclass(frozen=True)
class Certificate:
    """What :meth:`Smooth.certify_sequential` returns.

    Attributes:
        label: the certified class, or ``ABSTAIN`` (-1).
        radius: the certified L2 radius in pixel space (0.0 when abstaining).
        num_samples: base-classifier evaluations spent on the image (the ``n0`` selection draws included).
    """

    label: int
    radius: float
    num_samples: int


def check_sigma(sigma: float) -> None:
    """One-line :class:`InputError` unless ``sigma`` (the smoothing noise level) is a positive finite number."""
    if not sigma > 0 or not math.isfinite(sigma):
        raise InputError(f"sigma must be a positive number, got {sigma}")


class Smooth:
    """A smoothed classifier.

    Args:
        classifier: ``nn.Module`` mapping images ``[N, C, H, W]`` in [0, 1] to logits ``[N, num_classes]``. The
            noisy copies are float32 (the Gaussian noise is added in full precision); run a bf16 / fp16
            classifier under ``torch.autocast``.
        num_classes: number of classes.
        sigma: noise level in [0, 1] pixel space (> 0).
        denoiser: a :class:`~diffaug.Denoiser` for denoised smoothing, or None for plain Cohen et al.
    """

    def __init__(self, classifier: nn.Module, num_classes: int, sigma: float, denoiser=None):
        check_sigma(sigma)
        if num_classes < 2:
            raise InputError(f"num_classes must be >= 2, got {num_classes}")
        self.classifier = classifier
        self.num_classes = int(num_classes)
        self.sigma = float(sigma)
        self.denoiser = denoiser
        self.t_star = None
        if denoiser is not None:
            target = 2 * self.sigma
            sigmas = denoiser.sigma(torch.arange(denoiser.num_timesteps, device=denoiser.alpha_bar.device)).cpu()
            if target > sigmas.max() * 1.05 or target < sigmas.min() / 1.05:
                raise InputError(
                    f"the denoiser's schedule reaches noise levels {sigmas.min():.3g}..{sigmas.max():.3g} in model "
                    f"space, but sigma={self.sigma} needs {target:.3g}; use a smaller sigma or another denoiser"
                )
            self.t_star = int(denoiser.t_from_sigma(target))
            self.alpha_bar_star = float(denoiser.alpha_bar[self.t_star])
            self.dds_mismatch = float(sigmas[self.t_star] / target)  # 1.0 = exact match

    def denoise(self, noisy: torch.Tensor) -> torch.Tensor:
        """The front end of the base classifier: DDS's one-shot denoised estimate of noisy pixel-space images
        (which may leave [0, 1]); the images unchanged without a denoiser."""
        if self.denoiser is None:
            return noisy
        den = self.denoiser
        x_t = math.sqrt(self.alpha_bar_star) * den.encode(noisy)
        t = torch.full((noisy.shape[0],), self.t_star, device=noisy.device)
        return den.decode(den.predict_x0(x_t, t, clip=True))

    def _check(self, x: torch.Tensor, batch_size: int, alpha: float | None = None, **counts) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise InputError("x must be a float image tensor [C, H, W] or [1, C, H, W] in [0, 1]")
        if x.ndim == 4 and x.shape[0] == 1:
            x = x[0]
        if x.ndim != 3:
            raise InputError(f"x must be one image [C, H, W] or [1, C, H, W], got {tuple(x.shape)}")
        if self.denoiser is not None:  # channels and size against the denoiser, and the values: one line each
            self.denoiser.check_images(x[None])
        else:
            check_image_values(x)
        check_sampling_args(batch_size, alpha, **counts)
        return x

    def noisy_copies(self, x: torch.Tensor, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``num`` copies of ``x`` with Gaussian noise of std ``sigma``, ``[num, C, H, W]``; the noise is drawn on
        the generator's device in one call, so the same generator gives the same copies however they are batched
        with other images'."""
        gen_device = generator.device if generator is not None else x.device
        noise = torch.randn((num, *x.shape), generator=generator, device=gen_device).to(x.device)
        return x.unsqueeze(0) + self.sigma * noise

    def _top_class(self, logits: torch.Tensor) -> torch.Tensor:
        """The base classifier's labels (CPU) from its logits, whose width must be ``num_classes``."""
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise InputError(f"the classifier gave logits of shape {tuple(logits.shape)} but Smooth was built with "
                             f"num_classes={self.num_classes}; pass num_classes=<the classifier's class count>")
        return logits.argmax(dim=1).cpu()

    @torch.no_grad()
    def sample_labels(self, x: torch.Tensor, num: int, batch_size: int, generator: torch.Generator | None = None,
                      classifiers=None) -> torch.Tensor:
        """Base-classifier labels ``[num]`` (int64, CPU) of ``num`` noisy copies of ``x``, in draw order.

        With ``classifiers`` (a list of modules in place of this one's), labels ``[len(classifiers), num]`` of each
        on the same noisy, denoised copies: several base classifiers on one set of draws for one denoiser pass.
        """
        heads = [self.classifier] if classifiers is None else list(classifiers)
        labels = []
        remaining = num
        while remaining > 0:
            b = min(batch_size, remaining)
            front = self.denoise(self.noisy_copies(x, b, generator))
            labels.append(torch.stack([self._top_class(head(front)) for head in heads]))
            remaining -= b
        out = torch.cat(labels, dim=1) if labels else torch.zeros((len(heads), 0), dtype=torch.long)
        return out[0] if classifiers is None else out

    def sample_counts(self, x: torch.Tensor, num: int, batch_size: int,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Class counts ``[num_classes]`` (int64, CPU) of the base classifier over ``num`` noisy copies of ``x``."""
        return torch.bincount(self.sample_labels(x, num, batch_size, generator), minlength=self.num_classes)

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int,
                generator: torch.Generator | None = None) -> tuple[int, float]:
        """Cohen et al.'s CERTIFY: ``(label, L2 radius)``, or ``(ABSTAIN, 0.0)``.

        ``n0`` draws select the top class, ``n`` fresh draws estimate ``pA``'s one-sided (1 - alpha)
        Clopper-Pearson lower bound; abstain when it is below 0.5, else the radius is ``sigma * inv_Phi(pA)``.
        """
        x = self._check(x, batch_size, alpha, n0=n0, n=n)
        if alpha ** (1.0 / n) < 0.5:
            warnings.warn(f"n={n} is too small for any certificate at alpha={alpha}: every image will abstain "
                          f"(n must be at least {math.ceil(math.log(alpha) / math.log(0.5))})", stacklevel=2)
        c_hat = int(self.sample_counts(x, n0, batch_size, generator).argmax())
        n_a = int(self.sample_counts(x, n, batch_size, generator)[c_hat])
        return cohen_radius(c_hat, n_a, n, alpha, self.sigma)

    def certify_sequential(self, x: torch.Tensor, alpha: float, max_n: int, batch_size: int, *, radii=None,
                           n0: int = 100, radius_tol: float | None = None, futility: float = FUTILITY,
                           generator: torch.Generator | None = None) -> Certificate:
        """CERTIFY with adaptive sampling: the same guarantee, usually with far fewer draws.

        ``n0`` draws select the top class ``c`` as in :meth:`certify`. Fresh draws then arrive on a schedule fixed
        in advance (:func:`~diffaug.sequential.look_schedule`: 32 draws, then 10 % more per look, at most 250 and
        at most ``batch_size`` more) and after each look the rule of :mod:`diffaug.sequential` decides:

        * with ``radii`` (a grid; radius 0 is always on it): exact group-sequential tests of
          ``pA <= Phi(r / sigma)`` with alpha spending, one per grid radius, tested in order
          (:func:`~diffaug.sequential.grid_test`). Sampling stops when the last grid radius is certified, or when
          the next one could be certified by ``max_n`` only with predictive probability below ``futility`` (1 %),
          or at ``max_n``. Returns the largest grid radius certified;
        * without ``radii``: the beta-binomial mixture confidence sequence (Robbins 1970; Howard et al. 2021) at
          ``alpha / 2`` plus the Clopper-Pearson bound at ``max_n`` at ``alpha / 2``; stops when the upper bound
          shows ``pA <= 1/2`` (abstain) or when the radius of the lower bound, ``sigma * inv_Phi(lower)``, is
          within ``radius_tol`` (default ``0.01 * sigma``) of the point estimate's radius or of the most it could
          still reach by ``max_n``. Returns ``sigma * inv_Phi(lower)``.

        Either way, with probability >= 1 - alpha the returned radius is certified, as with :meth:`certify`, and
        the stopping time needs no correction: both rules hold for any data-dependent stop at a look.

        Args:
            x: one image ``[C, H, W]`` (or ``[1, C, H, W]``) in [0, 1].
            alpha: failure probability in (0, 1).
            max_n: most estimation draws (the ``n`` of a fixed-n CERTIFY with the same budget), >= ``n0``.
            batch_size: most noisy copies in one forward pass.
            radii: increasing grid of radii >= 0, or None for a continuous radius.
            n0: selection draws.
            radius_tol: stopping tolerance of the continuous radius (> 0).
            futility: in [0, 1); with ``radii``, give up a radius whose chance of being certified by ``max_n`` is
                below it (0: only when no votes could certify it). It costs power, never validity.
            generator: the random generator of the noise.

        Returns:
            A :class:`Certificate` ``(label, radius, num_samples)``; ``(ABSTAIN, 0.0, ...)`` when nothing is
            certified.
        """
        radii = None if radii is None else list(radii)  # an iterator is read once, here
        check_sampling_args(batch_size, alpha, n0=n0, max_n=max_n)
        check_sequential_args(n0, max_n, radii, radius_tol, futility)  # radius_tol too, which the grid ignores
        if radii is not None:  # certify_sequential_many checks x before any draw
            return next(self.certify_sequential_many([(None, x, generator)], alpha, max_n, batch_size, radii=radii,
                                                     n0=n0, futility=futility))[1]
        x = self._check(x, batch_size, alpha, n0=n0, max_n=max_n)
        c_hat = int(self.sample_counts(x, n0, batch_size, generator).argmax())
        looks = look_schedule(max_n, batch_size)

        def draw(m: int) -> int:
            return int(self.sample_counts(x, m, batch_size, generator)[c_hat])

        lower, trials = continuous_test(draw, alpha, looks, (0.01 * self.sigma if radius_tol is None
                                                             else float(radius_tol)) / self.sigma)
        if lower <= 0.5:
            return Certificate(ABSTAIN, 0.0, n0 + trials)
        return Certificate(c_hat, self.sigma * float(ndtri(lower)), n0 + trials)

    def certify_sequential_many(self, images, alpha: float, max_n: int, batch_size: int, *, radii, n0: int = 100,
                                futility: float = FUTILITY):
        """:meth:`certify_sequential` on a grid for a stream of images that share forward passes.

        One image's looks want few draws at first (32, 40, 50, ...), and forward passes that small waste a GPU
        (and, less, a CPU). Here several images are certified at once: each runs its own copy of the grid rule
        (:func:`~diffaug.sequential.grid_steps`), and the draws they want next are pooled, oldest image first,
        into forward passes of at most ``batch_size`` copies; a new image is taken in while the pending draws fit
        in one pass. Each image's noise comes from its own generator, drawn per request exactly as
        :meth:`certify_sequential` draws it, so each certificate is the one that image would get alone (up to the
        float rounding of a differently composed batch) and has the same guarantee.

        Args:
            images: iterable of ``(key, x, generator)``: any key, one image ``[C, H, W]`` in [0, 1], its generator.
            alpha, max_n, batch_size, radii, n0, futility: as in :meth:`certify_sequential` (``radii`` required).

        Yields:
            ``(key, Certificate)`` as each image finishes (not necessarily in input order).

        Bad arguments raise :class:`~diffaug.InputError` here, when called, before any image is read.
        """
        if radii is None:
            raise InputError("certify_sequential_many certifies on a grid: pass radii (e.g. (0.0, 0.25, 0.5)), or "
                             "use certify_sequential for a continuous radius")
        radii = list(radii)  # an iterator is read once, here
        check_sampling_args(batch_size, alpha, n0=n0, max_n=max_n)
        check_sequential_args(n0, max_n, radii, None, futility)
        grid = sorted({0.0, *map(float, radii)})  # radius 0 (a certified label) always sits on the grid
        return self._pooled_certificates(images, alpha, max_n, batch_size, n0, grid, futility)

    def _pooled_certificates(self, images, alpha: float, max_n: int, batch_size: int, n0: int, grid: list[float],
                             futility: float):
        """The loop of :meth:`certify_sequential_many` (arguments checked), a generator of ``(key, Certificate)``."""
        looks = look_schedule(max_n, batch_size)
        source, active, layout = iter(images), [], None
        while True:
            while sum(a[4] for a in active) < batch_size and (item := next(source, None)) is not None:
                key, x, generator = item
                x = self._check(x, batch_size, alpha, n0=n0, max_n=max_n)
                if layout is not None and (x.shape, x.dtype, x.device) != layout:
                    raise InputError(f"images certified together must share one shape, dtype and device: "
                                     f"{tuple(x.shape)} {x.dtype} {x.device} after {tuple(layout[0])} {layout[1]} "
                                     f"{layout[2]}; bring them to one size, dtype and device first")
                layout = (x.shape, x.dtype, x.device)
                steps = self._grid_certificate(n0, batch_size, grid, alpha, looks, futility)
                active.append([key, x, generator, steps, next(steps)])
            if not active:
                return
            chosen, total = [], 0
            for a in active:  # the oldest requests that fit in one pass, at least one
                if chosen and total + a[4] > batch_size:
                    break
                chosen.append(a)
                total += a[4]
            with torch.no_grad():
                noisy = torch.cat([self.noisy_copies(x, m, generator) for _, x, generator, _, m in chosen])
                labels = self._top_class(self.classifier(self.denoise(noisy)))
            for a, part in zip(chosen, labels.split([a[4] for a in chosen])):
                try:
                    a[4] = a[3].send(part)
                except StopIteration as stop:
                    active = [b for b in active if b is not a]  # by identity: keys may repeat, images are tensors
                    yield a[0], stop.value

    def _grid_certificate(self, n0: int, batch_size: int, grid: list[float], alpha: float, looks, futility: float):
        """One image's grid certification as a coroutine: yields how many draws it wants next (at most
        ``batch_size``), is sent their labels, returns its :class:`Certificate`."""

        def labels_of(num: int):  # the labels of num draws, asked for in passes of at most batch_size
            parts = []
            for start in range(0, num, batch_size):
                parts.append((yield min(batch_size, num - start)))
            return torch.cat(parts)

        c_hat = int(torch.bincount((yield from labels_of(n0)), minlength=self.num_classes).argmax())
        steps = sequential.grid_steps([float(ndtr(r / self.sigma)) for r in grid], alpha, looks, futility)
        wanted = next(steps)
        while True:
            votes = int(((yield from labels_of(wanted)) == c_hat).sum())
            try:
                wanted = steps.send(votes)
            except StopIteration as stop:
                passed, trials = stop.value
                break
        if passed < 0:
            return Certificate(ABSTAIN, 0.0, n0 + trials)
        return Certificate(c_hat, grid[passed], n0 + trials)

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int,
                generator: torch.Generator | None = None) -> int:
        """Cohen et al.'s PREDICT: the top class, or ABSTAIN when a two-sided binomial test of the top two
        counts (SciPy's ``binomtest``, p = 0.5) has p-value above ``alpha``."""
        x = self._check(x, batch_size, alpha, n=n)
        counts = self.sample_counts(x, n, batch_size, generator)
        top2 = counts.topk(2)
        n_a, n_b = int(top2.values[0]), int(top2.values[1])
        if binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha:
            return ABSTAIN
        return int(top2.indices[0])
