"""Perceptually aligned gradients (the paper's Figure 3): what a classifier's gradient looks like through DiffAug.

An image is diffused to ``t`` (default 300) and the gradient of ``log p(y | x0_hat(x_t))`` is taken with respect to
``x_t``, through the denoiser's one-step estimate; a guidance classifier's gradient is ``grad log p(y | x_t)``
(through the denoiser too for a DA classifier). Each gradient is min-max normalised per image for display.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..denoiser import Denoiser
from ..errors import InputError
from ..sampling import input_gradient


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Per-image min-max normalisation to [0, 1] of ``[N, C, H, W]`` (a constant image maps to 0.5)."""
    flat = x.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    out = torch.where(hi > lo, (flat - lo) / (hi - lo).clamp(min=1e-12), torch.full_like(flat, 0.5))
    return out.view_as(x)


def classifier_gradient(classifier, den: Denoiser, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``grad_{x_t} log p(y | x0_hat(x_t))`` for a classifier of images in [0, 1] (x_t in model space)."""
    def log_prob(x_in):
        x0 = den.predict_x0(x_in, t, cond_weight=0 if den.is_conditional else None, clip=True)
        logp = F.log_softmax(classifier(den.decode(x0)).float(), 1)[torch.arange(len(y), device=y.device), y]
        return logp.sum()
    return input_gradient(log_prob, x_t)[0]


def pag_panel(den: Denoiser, images: torch.Tensor, labels: torch.Tensor, models: dict, *, t: int = 300,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Columns ``[image, x_t, gradient of each model]`` as ``[N, 2 + len(models), C, H, W]`` in [0, 1].

    ``models``: name -> a classifier of [0, 1] images, or a :class:`~diffaug.guidance.GuidanceClassifier`.
    """
    from ..guidance import GuidanceClassifier

    if not 0 <= t < den.num_timesteps:
        raise InputError(f"--t must lie in [0, {den.num_timesteps}), got {t}")
    den.check_images(images)
    n = images.shape[0]
    tt = torch.full((n,), t, device=images.device)
    gen_device = generator.device if generator is not None else images.device
    noise = torch.randn(images.shape, generator=generator, device=gen_device).to(images.device)
    x_t = den.q_sample(den.encode(images), tt, noise)
    cols = [images, den.decode(x_t).clamp(0, 1)]
    for model in models.values():
        if isinstance(model, GuidanceClassifier):
            grad = model.grad_log_prob(x_t, tt, labels)
        else:
            grad = classifier_gradient(model, den, x_t, tt, labels)
        cols.append(minmax(grad))
    return torch.stack(cols, dim=1)


def run_pag(*, classifiers: list[str], guidance: list[str], denoiser: str, data: str = "digits", t: int = 300,
            n: int = 6, seed: int = 0, out: str | Path, device: str = "cpu", speed=None,
            workers: int | None = None) -> Path:
    """The ``diffaug pag`` job: load the models, take one test image per class (the first ``n``), draw the panel.
    ``speed``: an :class:`~diffaug.utils.accel.Speed` for every network (gradients flow through all of them).

    ``digits`` / CIFAR-10 are read in memory (as before); on an image folder only those ``n`` test images are
    read (through the loader, ``workers`` processes), brought to the models' input size by the evaluation
    transform (the classifiers' and guidance classifiers' sizes must agree; the denoiser runs at it)."""
    from ..classifier import load_classifier
    from ..data import check_workers, is_in_memory, load_dataset
    from ..denoiser import load_denoiser
    from ..guidance import GuidanceClassifier
    from .sets import folder_keys

    if not classifiers and not guidance:
        raise InputError("give at least one --classifier or --guidance folder")
    if n < 1:
        raise InputError(f"--n must be >= 1, got {n}")
    check_workers(workers)
    den = load_denoiser(denoiser, device=device, speed=speed)
    if not 0 <= t < den.num_timesteps:
        raise InputError(f"--t must lie in [0, {den.num_timesteps}), got {t}")
    models = {}
    keys = iter(folder_keys([*classifiers, *guidance]))  # runs/a/s0, runs/b/s0 -> a/s0, b/s0
    for folder in classifiers:
        model = load_classifier(folder, device=device, speed=speed).eval()
        models[f"{model.spec.get('recipe', '?')}: {next(keys)}"] = model
    in_memory = is_in_memory(data)
    if not in_memory:  # before the guidance classifiers: they need the denoiser at their size
        den, test, models = _streamed_setup(data, den, models, guidance)
    for folder in guidance:
        g = GuidanceClassifier.from_pretrained(folder, den, speed=speed)
        models[f"{g.kind} guidance: {next(keys)}"] = g
    if in_memory:
        test = load_dataset(data, "test")
        den.check_images(test.images[:1], name=f"images of {data}")
    idx = torch.cat([torch.nonzero(test.labels == c)[:1, 0] for c in range(test.num_classes)])[:n]
    if in_memory:
        images, labels = test.images[idx], test.labels[idx]
    else:
        from ..data import eval_transform, read_sample

        picked = read_sample(test, eval_transform(den.image_size[0]), indices=idx, workers=workers)
        images, labels = picked.images, picked.labels
    gen = torch.Generator(device=device).manual_seed(seed)
    return write_pag(den, images.to(device), labels.to(device), models, out, t=t, generator=gen)


def _streamed_setup(data, den: Denoiser, classifiers: dict, guidance: list[str]):
    """An image folder's test split, the denoiser at the models' one input size, and the classifiers scored on
    the folder's classes (matched by name)."""
    import json

    from ..classifier import input_size
    from ..data import open_splits
    from ..data.files import check_colour_kept
    from .sets import match_classes

    sizes = {name: input_size(m) for name, m in classifiers.items()}
    for folder in guidance:
        spec = Path(folder) / "guidance.json"
        if spec.is_file():
            shape = json.loads(spec.read_text()).get("image_size")
            sizes[f"{Path(folder).name} (guidance)"] = shape[0] if shape and shape[0] == shape[1] else None
    known = {s for s in sizes.values() if s is not None}
    if len(known) > 1:
        raise InputError("the models take different input sizes (" + ", ".join(f"{k}: {v}" for k, v in sizes.items())
                         + "); draw them in separate panels")
    if known:
        den = den.at_size(known.pop())
    elif den.image_size is None:
        raise InputError(f"no model records an input size and the denoiser has none; cannot read {data} at a size")
    test = open_splits(data, channels=den.channels)["test"]
    check_colour_kept(test, den.channels, data)
    classifiers = {name: match_classes(m, test.classes, test.num_classes, name, str(data))
                   for name, m in classifiers.items()}
    return den, test, classifiers


def write_pag(den: Denoiser, images, labels, models: dict, out: str | Path, *, t: int = 300,
              generator: torch.Generator | None = None) -> Path:
    """Draw the panel with matplotlib: one row per image, titled columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils.figures import save_figure

    panel = pag_panel(den, images, labels, models, t=t, generator=generator).detach().cpu()
    names = ["image", f"x_t (t={t})", *models]
    n, k = panel.shape[:2]
    fig, axes = plt.subplots(n, k, figsize=(1.4 * k, 1.4 * n), squeeze=False)
    for i in range(n):
        for j in range(k):
            img = panel[i, j]
            axes[i, j].imshow(img[0] if img.shape[0] == 1 else img.permute(1, 2, 0), cmap="gray", vmin=0, vmax=1)
            axes[i, j].axis("off")
            if i == 0:
                axes[i, j].set_title(names[j], fontsize=6)
    return save_figure(fig, out, dpi=150)
