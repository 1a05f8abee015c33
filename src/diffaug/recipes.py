"""The paper's training recipes as modules, for a user's own training loop.

A recipe holds the classifier and turns one labelled batch into ``(loss, logits)``: it builds the batch's views,
runs **one** forward pass of the classifier over all of them (so BatchNorm sees them together, as in the paper's
code) and sums the loss terms::

    recipe = diffaug.AugMix(model) + diffaug.DiffAugRecipe(model, diffaug.DiffAug(den))
    for x, y in loader:                                   # x: [N, C, H, W] floats in [0, 1]
        loss, logits = recipe(x, y, generator=g)
        loss.backward(); opt.step(); opt.zero_grad()      # opt over model.parameters()

* :class:`Plain`: ``CE(f(x), y)``.
* :class:`DiffAugRecipe` (the paper): ``CE(f(x), y) + w * CE(f(DA(x)), y)``, ``DA`` a fresh DiffAug view of the
  first ``round(fraction * N)`` images, made without a graph (the denoiser is frozen).
* :class:`AugMix`: two AugMix views (torchvision's AugMix with the AugMix paper's op set) and the Jensen-Shannon
  consistency loss (Hendrycks et al. 2020; timm's ``JsdCrossEntropy``) over ``(x, AugMix_1(x), AugMix_2(x))``.
* Sums (``AugMix(...) + DiffAugRecipe(...)``): the AugMix loss plus ``w * CE(DiffAug)`` in the same forward.

``diffaug train --recipe NAME`` runs exactly these modules (:func:`from_name`). Every random draw comes from the
``generator`` passed in, so a step is replayable.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError, check_image_batch, check_image_values
from .utils.seeding import private_seed

RECIPES = ("plain", "diffaug", "augmix", "augmix+diffaug")


def check_settings(*, label_smoothing: float, diffaug_fraction: float, diffaug_weight: float,
                   jsd_weight: float) -> None:
    """The recipes' settings (also checked by ``diffaug train`` before any work): one line each."""
    if not 0 <= label_smoothing < 1:
        raise InputError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
    if not 0 < diffaug_fraction <= 1:
        raise InputError(f"diffaug_fraction must lie in (0, 1], got {diffaug_fraction}")
    if not diffaug_weight >= 0 or not jsd_weight >= 0:
        raise InputError(f"diffaug_weight and jsd_weight must be >= 0, got {diffaug_weight} and {jsd_weight}")


AUGMIX_SEVERITY = 2  # torchvision's bins for the AugMix paper's ImageNet severity 1 (see AugMixViews)


class AugMixViews:
    """Two AugMix views per image (torchvision's AugMix with the AugMix paper's ops), seeded per call.

    ``severity`` counts torchvision's magnitude bins (k / 9 of each op's maximum, k < severity). The default 2
    (0 or 1/9 of the maximum, mean 0.056) is the AugMix paper's ImageNet setting, which DiffAug's authors trained
    with: Hendrycks' severity 1 draws U(0.01, 0.1) of the same maxima (mean 0.055). torchvision's own default, 3,
    is twice as strong on average."""

    def __init__(self, severity: int = AUGMIX_SEVERITY):
        from torchvision.transforms import AugMix as TorchvisionAugMix

        self.augmix = TorchvisionAugMix(severity=severity, all_ops=False)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        check_image_batch(x)
        check_image_values(x)  # the views are made from x * 255 as bytes: a sync they need anyway
        if x.shape[0] == 0:
            return x.clone(), x.clone()
        device = generator.device if generator is not None else "cpu"  # a CUDA generator draws on its device
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device))
        u8 = (x.detach().cpu() * 255).round().to(torch.uint8)
        with private_seed(seed):  # torchvision draws from the global RNG: give it a private, replayable one
            views = [torch.stack([self.augmix(img) for img in u8]) for _ in range(2)]
        return tuple(v.to(x.device, x.dtype) / 255 for v in views)


class Recipe(nn.Module):
    """A training recipe: views of a batch, one forward pass over all of them, the summed loss.

    Build one with :class:`Plain`, :class:`DiffAugRecipe`, :class:`AugMix` or a sum of them.

    Args:
        model: the classifier (``[N, C, H, W]`` floats in [0, 1] -> logits); the recipe's only submodule.
        label_smoothing: of every cross-entropy term (and of the JSD loss's).
        augmix: add two AugMix views per image and replace the clean CE by the JSD loss.
        jsd_weight: the JSD consistency weight (AugMix paper: 12).
        diffaug: a :class:`diffaug.DiffAug` (kept outside the module tree: it is frozen, not trained; so
            ``recipe.to(...)`` does not move it, move the DiffAug itself, and a copy of the recipe shares it).
            A conditional DiffAug (``cond_weight > 0``) gets the batch's labels.
        diffaug_fraction: the fraction of each batch that gets a DiffAug view, in (0, 1] (1 = the paper).
        diffaug_weight: ``w`` of the DiffAug term, >= 0.
    """

    def __init__(self, model: nn.Module, *, label_smoothing: float = 0.0, augmix: bool = False,
                 jsd_weight: float = 12.0, diffaug: nn.Module | None = None, diffaug_fraction: float = 1.0,
                 diffaug_weight: float = 1.0):
        super().__init__()
        check_settings(label_smoothing=label_smoothing, diffaug_fraction=diffaug_fraction,
                       diffaug_weight=diffaug_weight, jsd_weight=jsd_weight)
        self.model = model
        self.label_smoothing, self.jsd_weight = label_smoothing, jsd_weight
        self.diffaug_fraction, self.diffaug_weight = diffaug_fraction, diffaug_weight
        self.__dict__["diffaug"] = diffaug  # not a submodule: not in parameters() or state_dict()
        self.augmix_views = AugMixViews() if augmix else None
        self.jsd = None
        if augmix:
            from timm.loss import JsdCrossEntropy

            self.jsd = JsdCrossEntropy(num_splits=3, alpha=jsd_weight, smoothing=label_smoothing)

    def __deepcopy__(self, memo):
        # a copy (an EMA of the recipe, say) shares the DiffAug: it is frozen, never trained, and its denoiser
        # may be large (ADM-256: 2.2 GB); everything else is copied as usual
        if self.diffaug is not None:
            memo.setdefault(id(self.diffaug), self.diffaug)  # unless this copy already copied it (a tuple with it)
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(self.__dict__, memo))
        return copied

    @property
    def name(self) -> str:
        """The recipe's name as ``diffaug train --recipe`` spells it."""
        parts = (["augmix"] if self.augmix_views else []) + (["diffaug"] if self.diffaug is not None else [])
        return "+".join(parts) or "plain"

    def __add__(self, other: "Recipe") -> "Recipe":
        if not isinstance(other, Recipe):
            return NotImplemented
        if other.model is not self.model:
            raise InputError("recipes can be added only when they train the same model object")
        if self.diffaug is not None and other.diffaug is not None:
            raise InputError("both recipes add a DiffAug term; add a DiffAugRecipe once")
        if self.label_smoothing != other.label_smoothing:
            raise InputError(f"recipes with different label_smoothing ({self.label_smoothing} vs "
                             f"{other.label_smoothing}) cannot be added")
        da = self if self.diffaug is not None else other
        mix = self if self.augmix_views is not None else other
        return Recipe(self.model, label_smoothing=self.label_smoothing, augmix=mix.augmix_views is not None,
                      jsd_weight=mix.jsd_weight, diffaug=da.diffaug, diffaug_fraction=da.diffaug_fraction,
                      diffaug_weight=da.diffaug_weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None, *,
                x_diffaug: torch.Tensor | None = None,
                x_aligned: list[torch.Tensor] | tuple[torch.Tensor, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss and the logits of one step.

        Args:
            x: ``[N, C, H, W]`` floats in [0, 1]; y: ``[N]`` class indices.
            generator: every random draw of the step (AugMix ops, DiffAug's t and noise).
            x_diffaug: another view of the same images that DiffAug is applied to (e.g. their centre crop, as the
                paper's ImageNet code); default ``x``.
            x_aligned: views of the same images from aligned copies of the data (DeepAugment's EDSR / CAE, same
                crop); each adds ``CE(f(view), y)``.

        Returns:
            ``(loss, logits)``: the scalar loss, and the logits of every view in the order clean, AugMix 1 and 2,
            aligned, DiffAug (``[N * views + n_diffaug, classes]``).
        """
        views, n = [x], x.shape[0]
        if self.augmix_views is not None:
            views += list(self.augmix_views(x, generator))
        first_aligned = len(views) * n
        views += list(x_aligned)
        n_da = 0
        if self.diffaug is not None:
            n_da = max(1, round(self.diffaug_fraction * n))
            source = (x if x_diffaug is None else x_diffaug)[:n_da]
            labels = (y[:n_da],) if getattr(self.diffaug, "needs_labels", False) else ()  # conditional DiffAug
            with torch.no_grad():
                views.append(self.diffaug(source, *labels, generator=generator))
        logits = self.model(torch.cat(views))
        if self.jsd is not None:
            loss = self.jsd(logits[: 3 * n], y.repeat(3))
        else:
            loss = F.cross_entropy(logits[:n], y, label_smoothing=self.label_smoothing)
        for j in range(len(x_aligned)):
            start = first_aligned + j * n
            loss = loss + F.cross_entropy(logits[start : start + n], y, label_smoothing=self.label_smoothing)
        if n_da:
            loss = loss + self.diffaug_weight * F.cross_entropy(logits[-n_da:], y[:n_da],
                                                                label_smoothing=self.label_smoothing)
        return loss, logits


class Plain(Recipe):
    """``CE(f(x), y)``: the baseline recipe. Args as :class:`Recipe`."""

    def __init__(self, model: nn.Module, *, label_smoothing: float = 0.0):
        super().__init__(model, label_smoothing=label_smoothing)


class DiffAugRecipe(Recipe):
    """The paper's recipe: ``CE(f(x), y) + weight * CE(f(DiffAug(x)), y)`` in one forward pass.

    Args:
        model: the classifier.
        diffaug: a :class:`diffaug.DiffAug` with the frozen denoiser.
        fraction: the fraction of each batch that gets a DiffAug view, in (0, 1].
        weight: the weight of the DiffAug term.
        label_smoothing: of both CE terms.
    """

    def __init__(self, model: nn.Module, diffaug: nn.Module, *, fraction: float = 1.0, weight: float = 1.0,
                 label_smoothing: float = 0.0):
        super().__init__(model, label_smoothing=label_smoothing, diffaug=diffaug, diffaug_fraction=fraction,
                         diffaug_weight=weight)


class AugMix(Recipe):
    """AugMix (Hendrycks et al. 2020): two AugMix views per image and the Jensen-Shannon consistency loss.

    Args:
        model: the classifier.
        jsd_weight: the consistency weight (12 in the AugMix paper).
        label_smoothing: of the cross-entropy inside the JSD loss.
    """

    def __init__(self, model: nn.Module, *, jsd_weight: float = 12.0, label_smoothing: float = 0.0):
        super().__init__(model, label_smoothing=label_smoothing, augmix=True, jsd_weight=jsd_weight)


def from_name(name: str, model: nn.Module, *, diffaug: nn.Module | None = None, label_smoothing: float = 0.0,
              jsd_weight: float = 12.0, diffaug_fraction: float = 1.0, diffaug_weight: float = 1.0) -> Recipe:
    """The recipe ``diffaug train --recipe NAME`` trains with (one of :data:`RECIPES`)."""
    if name not in RECIPES:
        raise InputError(f"unknown recipe {name!r}; use one of {', '.join(RECIPES)}")
    if "diffaug" in name and diffaug is None:
        raise InputError(f"recipe {name} needs a DiffAug module (diffaug=DiffAug(denoiser))")
    return Recipe(model, label_smoothing=label_smoothing, augmix="augmix" in name, jsd_weight=jsd_weight,
                  diffaug=diffaug if "diffaug" in name else None, diffaug_fraction=diffaug_fraction,
                  diffaug_weight=diffaug_weight)
