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
from scipy.optimize import brentq
from scipy.special import betaln, ndtr, ndtri
from scipy.stats import beta, binomtest, norm
from torch import nn

from .errors import InputError

ABSTAIN = -1


def lower_confidence_bound(successes: int, trials: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion."""
    if successes <= 0:
        return 0.0
    return float(beta.ppf(alpha, successes, trials - successes + 1))


# Prior of the beta-binomial mixture: Beta(1, 0.1) puts enough mass near p = 1 that an image the base classifier
# always gets right needs only ~13 % more draws than a fixed-n Clopper-Pearson bound to pass Phi(3) (both at
# alpha = 0.001: 5,800 vs 5,114), while its bound at 10,000 draws is within 0.06 sigma of Clopper-Pearson's for
# p in 0.6..0.99.
CS_PRIOR = (1.0, 0.1)
FIRST_LOOK = 32  # draws before the first look of certify_sequential
LOOK_GROWTH = 1.25  # each look comes after 25 % more draws: fewer, larger forward passes; overshoot <= 25 %


def log_mixture_martingale(successes: int, trials: int, p: float, prior: tuple[float, float] = CS_PRIOR) -> float:
    """Log of the beta-binomial mixture martingale ``M_t(p)`` (Robbins 1970; Howard et al. 2021, Sec. 3).

    ``M_t(p) = B(a + S, b + t - S) / B(a, b) / (p^S (1 - p)^(t - S))`` with ``S`` successes in ``t`` Bernoulli(p)
    trials and a ``Beta(a, b)`` prior: a nonnegative martingale with mean 1 when the true rate is ``p``.
    """
    a, b = prior
    failures = trials - successes
    log_lik = (successes * math.log(p) if successes else 0.0) + (failures * math.log1p(-p) if failures else 0.0)
    return float(betaln(a + successes, b + failures) - betaln(a, b)) - log_lik


def cs_side(successes: int, trials: int, alpha: float, p: float, prior: tuple[float, float] = CS_PRIOR) -> int:
    """Where ``p`` lies against the confidence sequence ``{p : M_t(p) < 1 / alpha}`` at ``t = trials``.

    Returns -1 when the lower bound is above ``p``, +1 when the upper bound is below it, 0 when ``p`` is inside.
    The set is an interval around ``S / t`` because ``log M_t`` is convex in ``p`` and ``M_t(S / t) <= 1``.
    """
    if trials == 0 or log_mixture_martingale(successes, trials, p, prior) < math.log(1.0 / alpha):
        return 0
    return -1 if p < successes / trials else 1


def confidence_sequence(successes: int, trials: int, alpha: float,
                        prior: tuple[float, float] = CS_PRIOR) -> tuple[float, float]:
    """Anytime-valid ``(lower, upper)`` bounds on a Bernoulli rate: the ends of ``{p : M_t(p) < 1 / alpha}``.

    By Ville's inequality ``P(exists t: M_t(p) >= 1 / alpha) <= alpha``, so with probability >= 1 - alpha the
    interval holds the true rate at every ``t`` at once, and sampling may stop at any data-dependent time.
    """
    if trials == 0:
        return 0.0, 1.0
    p_hat = successes / trials

    def excess(p: float) -> float:
        return log_mixture_martingale(successes, trials, p, prior) - math.log(1.0 / alpha)

    lo_end, hi_end = 1e-300, 1 - 1e-16
    lower = 0.0 if successes == 0 or excess(lo_end) < 0 else brentq(excess, lo_end, p_hat, xtol=1e-14)
    upper = 1.0 if successes == trials or excess(hi_end) < 0 else brentq(excess, p_hat, hi_end, xtol=1e-14)
    return lower, upper


def sequence_side(successes: int, trials: int, alpha: float, p: float, max_n: int) -> int:
    """:func:`cs_side` for the lower/upper bounds that ``certify_sequential`` uses over the draws 1..``max_n``: the
    mixture confidence sequence at ``alpha / 2``, and at ``trials == max_n`` also the fixed-n Clopper-Pearson lower
    bound at ``alpha / 2``. Both hold together with probability >= 1 - alpha (union bound), at every look."""
    side = cs_side(successes, trials, alpha / 2, p)
    if side == 0 and trials == max_n and lower_confidence_bound(successes, trials, alpha / 2) > p:
        return -1
    return side


def sequence_bounds(successes: int, trials: int, alpha: float, max_n: int) -> tuple[float, float]:
    """The ``(lower, upper)`` bounds of :func:`sequence_side` at ``trials`` draws."""
    lower, upper = confidence_sequence(successes, trials, alpha / 2)
    if trials == max_n:
        lower = max(lower, lower_confidence_bound(successes, trials, alpha / 2))
    return lower, upper


def look_schedule(max_n: int, first: int = FIRST_LOOK, growth: float = LOOK_GROWTH) -> list[int]:
    """Draw counts at which ``certify_sequential`` looks: ``first``, then ``growth`` times more each time, up to
    ``max_n`` (always the last look)."""
    looks = []
    t = min(first, max_n)
    while t < max_n:
        looks.append(t)
        t = max(t + 1, math.ceil(t * growth))
    return looks + [max_n]


def update_grid(passed: int, capped: int, successes: int, trials: int, alpha: float, max_n: int,
                thresholds: list[float]) -> tuple[int, int]:
    """One look of the grid rule. ``thresholds`` are increasing ``Phi(r_k / sigma)``; ``passed`` is the largest
    index the lower bound has ever passed (-1: none), ``capped`` the smallest the upper bound has ever fallen
    below (``len(thresholds)``: none). Keeping the extremes over looks intersects the confidence sequence."""
    for k in range(passed + 1, capped):
        side = sequence_side(successes, trials, alpha, thresholds[k], max_n)
        if side < 0:
            passed = k
        elif side > 0:
            capped = k
            break
    return passed, capped


def check_sampling_args(batch_size: int, alpha: float | None = None, **counts: int) -> None:
    """One-line errors for bad ``batch_size``, ``alpha`` and draw counts (``n0=``, ``n=``)."""
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    for name, value in counts.items():
        if value < 1:
            raise InputError(f"{name} must be >= 1, got {value}")
    if alpha is not None and not 0 < alpha < 1:
        raise InputError(f"alpha must lie in (0, 1), got {alpha}")


def check_sequential_args(n0: int, max_n: int, radii=None, radius_tol: float | None = None) -> None:
    """One-line errors for ``certify_sequential``'s own settings (``max_n`` vs ``n0``, the radius grid, the
    tolerance); ``check_sampling_args`` covers the rest."""
    if max_n < n0:
        raise InputError(f"max_n must be >= n0 ({n0}), got {max_n}; raise max_n or lower n0")
    if radii is not None:
        radii = list(radii)
        if not radii or any(not math.isfinite(r) or r < 0 for r in radii):
            raise InputError(f"radii must be a non-empty list of finite radii >= 0, got {radii}")
        if any(b <= a for a, b in zip(radii, radii[1:])):
            raise InputError(f"radii must be strictly increasing, got {radii}")
    if radius_tol is not None and not (radius_tol > 0 and math.isfinite(radius_tol)):
        raise InputError(f"radius_tol must be a positive number, got {radius_tol}")


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


class Smooth:
    """A smoothed classifier.

    Args:
        classifier: ``nn.Module`` mapping images ``[N, C, H, W]`` in [0, 1] to logits ``[N, num_classes]``.
        num_classes: number of classes.
        sigma: noise level in [0, 1] pixel space (> 0).
        denoiser: a :class:`~diffaug.Denoiser` for denoised smoothing, or None for plain Cohen et al.
    """

    def __init__(self, classifier: nn.Module, num_classes: int, sigma: float, denoiser=None):
        if not sigma > 0 or not math.isfinite(sigma):
            raise InputError(f"sigma must be a positive number, got {sigma}")
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

    def _base_predict(self, noisy: torch.Tensor) -> torch.Tensor:
        """Base classifier on noisy images in pixel space (may leave [0, 1]); returns labels ``[N]``."""
        if self.denoiser is not None:
            den = self.denoiser
            x_t = math.sqrt(self.alpha_bar_star) * den.encode(noisy)
            t = torch.full((noisy.shape[0],), self.t_star, device=noisy.device)
            noisy = den.decode(den.predict_x0(x_t, t, clip=True))
        return self.classifier(noisy).argmax(dim=1)

    def _check(self, x: torch.Tensor, batch_size: int, alpha: float | None = None, **counts) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise InputError("x must be a float image tensor [C, H, W] or [1, C, H, W] in [0, 1]")
        if x.ndim == 4 and x.shape[0] == 1:
            x = x[0]
        if x.ndim != 3:
            raise InputError(f"x must be one image [C, H, W] or [1, C, H, W], got {tuple(x.shape)}")
        lo, hi = x.min().item(), x.max().item()
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0 or hi > 1:
            raise InputError(f"x must lie in [0, 1] with no NaN/Inf, got min {lo:.4g} max {hi:.4g}")
        check_sampling_args(batch_size, alpha, **counts)
        return x

    @torch.no_grad()
    def sample_counts(self, x: torch.Tensor, num: int, batch_size: int,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Class counts ``[num_classes]`` (int64, CPU) of the base classifier over ``num`` noisy copies of ``x``."""
        counts = torch.zeros(self.num_classes, dtype=torch.long, device=x.device)
        gen_device = generator.device if generator is not None else x.device
        remaining = num
        while remaining > 0:
            b = min(batch_size, remaining)
            noise = torch.randn((b, *x.shape), generator=generator, device=gen_device).to(x.device)
            labels = self._base_predict(x.unsqueeze(0) + self.sigma * noise)
            counts += torch.bincount(labels, minlength=self.num_classes)
            remaining -= b
        return counts.cpu()

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
        p_a = lower_confidence_bound(n_a, n, alpha)
        if p_a < 0.5:
            return ABSTAIN, 0.0
        return c_hat, self.sigma * float(norm.ppf(p_a))

    def certify_sequential(self, x: torch.Tensor, alpha: float, max_n: int, batch_size: int, *, radii=None,
                           n0: int = 100, radius_tol: float | None = None,
                           generator: torch.Generator | None = None) -> Certificate:
        """CERTIFY with adaptive sampling: the same guarantee, usually with far fewer draws.

        ``n0`` draws select the top class ``c`` as in :meth:`certify`. Fresh draws then arrive on a geometric
        schedule (:func:`look_schedule`: 32 draws, then 25 % more per look, each forward pass at most
        ``batch_size``) and after each look an anytime-valid confidence sequence for ``pA = P(f(x + noise) = c)``
        is updated: the beta-binomial mixture (Robbins 1970, "Statistical methods related to the law of the
        iterated logarithm"; Howard, Ramdas, McAuliffe & Sekhon 2021, "Time-uniform, nonparametric,
        nonasymptotic confidence sequences", Ann. Statist., Sec. 3) at ``alpha / 2``, intersected over the looks,
        plus at ``max_n`` draws the fixed-n Clopper-Pearson bound at ``alpha / 2`` (:func:`sequence_side`). Both
        hold at every draw count at once with probability >= 1 - alpha (Ville's inequality and a union bound),
        so stopping when the data allow needs no correction for peeking. Sampling stops at ``max_n`` draws or
        earlier when:

        * the upper bound shows ``pA <= 1/2``: abstain;
        * with ``radii`` (a grid; radius 0 is always on it): the largest grid radius certified (lower bound
          above ``Phi(r / sigma)``) is decided: it is the last, or the upper bound is below the next one's
          threshold, or not even ``max_n`` draws that all vote ``c`` could pass it. Returns that grid radius;
        * without ``radii``: the radius of the lower bound, ``sigma * inv_Phi(lower)``, is within
          ``radius_tol`` (default ``0.01 * sigma``) of the point estimate's radius or of the most it could
          still reach by ``max_n``. Returns ``sigma * inv_Phi(lower)``.

        With probability >= 1 - alpha the returned radius is certified, as with :meth:`certify`.

        Args:
            x: one image ``[C, H, W]`` (or ``[1, C, H, W]``) in [0, 1].
            alpha: failure probability in (0, 1).
            max_n: most estimation draws (the ``n`` of a fixed-n CERTIFY with the same budget), >= ``n0``.
            batch_size: most noisy copies in one forward pass.
            radii: increasing grid of radii >= 0, or None for a continuous radius.
            n0: selection draws.
            radius_tol: stopping tolerance of the continuous radius (> 0).
            generator: the random generator of the noise.

        Returns:
            A :class:`Certificate` ``(label, radius, num_samples)``; ``(ABSTAIN, 0.0, ...)`` when nothing is
            certified.
        """
        x = self._check(x, batch_size, alpha, n0=n0, max_n=max_n)
        check_sequential_args(n0, max_n, radii, radius_tol)
        c_hat = int(self.sample_counts(x, n0, batch_size, generator).argmax())
        successes = trials = 0
        if radii is not None:  # radius 0 (a certified label) always sits on the grid
            grid = sorted({0.0, *map(float, radii)})
            thresholds = [float(ndtr(r / self.sigma)) for r in grid]
            passed, capped = -1, len(grid)
            for look in look_schedule(max_n):
                successes += int(self.sample_counts(x, look - trials, batch_size, generator)[c_hat])
                trials = look
                passed, capped = update_grid(passed, capped, successes, trials, alpha, max_n, thresholds)
                if passed == len(grid) - 1 or capped == passed + 1:  # the last, or the next one is ruled out
                    break
                # not even max_n draws that all vote c_hat could pass the next threshold
                if sequence_side(successes + max_n - trials, max_n, alpha, thresholds[passed + 1], max_n) >= 0:
                    break
            if passed < 0:
                return Certificate(ABSTAIN, 0.0, n0 + trials)
            return Certificate(c_hat, grid[passed], n0 + trials)
        tol = (0.01 * self.sigma if radius_tol is None else float(radius_tol)) / self.sigma
        lower, upper = 0.0, 1.0
        for look in look_schedule(max_n):
            successes += int(self.sample_counts(x, look - trials, batch_size, generator)[c_hat])
            trials = look
            lo, hi = sequence_bounds(successes, trials, alpha, max_n)
            lower, upper = max(lower, lo), min(upper, hi)  # the intersection over looks is still valid
            reachable = max(lower, sequence_bounds(successes + max_n - trials, max_n, alpha, max_n)[0])
            if upper <= 0.5 or reachable <= 0.5:
                break
            if lower > 0.5 and min(ndtri(successes / trials), ndtri(reachable)) - ndtri(lower) <= tol:
                break
        if lower <= 0.5:
            return Certificate(ABSTAIN, 0.0, n0 + trials)
        return Certificate(c_hat, self.sigma * float(ndtri(lower)), n0 + trials)

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
