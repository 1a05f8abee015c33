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

import torch
from scipy.stats import beta, binomtest, norm
from torch import nn

from .errors import InputError

ABSTAIN = -1


def lower_confidence_bound(successes: int, trials: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion."""
    if successes <= 0:
        return 0.0
    return float(beta.ppf(alpha, successes, trials - successes + 1))


def check_sampling_args(batch_size: int, alpha: float | None = None, **counts: int) -> None:
    """One-line errors for bad ``batch_size``, ``alpha`` and draw counts (``n0=``, ``n=``)."""
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    for name, value in counts.items():
        if value < 1:
            raise InputError(f"{name} must be >= 1, got {value}")
    if alpha is not None and not 0 < alpha < 1:
        raise InputError(f"alpha must lie in (0, 1), got {alpha}")


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
