"""What the evaluations (``eval-shift``, ``eval-ood``, ``certify``) read, and how a classifier sees it.

* The classifier's own input contract: the input size it was trained at (``model.json``'s ``image_size``); a set
  at another resolution is brought to it by the evaluation transform (``Resize(size / 0.875)`` +
  ``CenterCrop(size)``), never scored at the wrong size. A ``model.json`` written before the size was recorded
  takes the data at its own size (the old behaviour).
* Classes matched by folder name (:func:`diffaug.data.class_index_map`): a set with a subset of the classifier's
  classes (ImageNet-R / -A) is scored on those classes' logits only (:func:`diffaug.data.restrict_logits`); a set
  with classes the classifier does not know names the first missing ones.
* Streaming: a lazy source is read in batches through a DataLoader with workers, so memory is bounded by the
  batch, not by the set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..errors import InputError


def folder_keys(folders, what: str = "classifier") -> list[str]:
    """One short, unique name per folder, for result tables and output sub-folders: its last path component, or
    as many trailing components as tell it apart from the others (``runs/a/s0``, ``runs/b/s0`` -> ``a/s0``,
    ``b/s0``; a folder whose whole path ends another's keeps its whole path, less the root). Paths are made
    absolute (not resolved through links) first, so a key is never absolute and ``s0`` and ``./s0`` are one folder.

    Raises:
        InputError: a folder given twice.
    """
    folders = list(folders)
    parts = [Path(os.path.abspath(f)).parts[1:] for f in folders]  # without the root: a key never escapes out/
    seen = {}
    for folder, p in zip(folders, parts):
        if p in seen:
            raise InputError(f"{what} folder {folder} is given twice ({seen[p]} is the same folder); give each once")
        seen[p] = folder
    return [_unique_suffix(p, parts[:i] + parts[i + 1:]) or str(folder)
            for i, (folder, p) in enumerate(zip(folders, parts))]


def _unique_suffix(parts: tuple, others: list[tuple]) -> str:
    """The shortest trailing run of ``parts`` that ends none of ``others`` (all of ``parts`` if there is none),
    joined with ``/``."""
    for k in range(1, len(parts) + 1):
        if all(q[-k:] != parts[-k:] for q in others):
            return "/".join(parts[-k:])
    return "/".join(parts)


def eval_size(models: dict, image_size: int | None = None) -> int | None:
    """The input size the evaluation feeds every classifier: ``image_size`` when given (checked), else the size
    the classifiers record (they must agree), else None (no classifier records one: data at its own size)."""
    from ..classifier import input_size
    from ..data import check_size

    if image_size is not None:
        return check_size(image_size)
    sizes = {name: input_size(m) for name, m in models.items()}
    known = {s for s in sizes.values() if s is not None}
    if len(known) > 1:
        raise InputError("the classifiers were trained at different input sizes ("
                         + ", ".join(f"{n}: {s}" for n, s in sizes.items()) + "); evaluate them separately or "
                         "pass --image-size")
    return known.pop() if known else None


def at_size(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """In-memory images ``[N, C, H, W]`` brought to ``size`` by the evaluation transform; unchanged when they
    already have it (or ``size`` is None)."""
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    from ..data import eval_transform

    return eval_transform(size)(images).as_subclass(torch.Tensor).contiguous()


class ClassColumns(nn.Module):
    """A classifier whose logits are those of a dataset's classes, in the dataset's order (so ``argmax`` is a
    dataset label). ``spec`` is the wrapped classifier's, with ``num_classes`` the dataset's."""

    def __init__(self, model: nn.Module, index: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("index", index.clone(), persistent=False)
        self.spec = {**getattr(model, "spec", {}), "num_classes": int(index.numel())}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..data import restrict_logits

        return restrict_logits(self.model(x), self.index)


def match_classes(model: nn.Module, classes: list[str] | None, num_classes: int, name: str, source: str) -> nn.Module:
    """``model`` scored on a set's classes: itself when its classes are the set's (same names in the same order,
    or, without recorded names, the same number), else a :class:`ClassColumns` over the set's classes.

    Raises:
        InputError: the set has classes the classifier does not know (the first are named), or, for a classifier
            that records no class names, another number of classes.
    """
    from ..data import class_index_map

    known = model.spec.get("classes")
    k = model.spec["num_classes"]
    if not known or not classes or len(known) != k:
        if k != num_classes:
            raise InputError(f"classifier {name} has {k} classes but {source} has {num_classes}; evaluate it on "
                             "the data it was trained for")
        return model
    try:
        index = class_index_map(list(classes), list(known))
    except InputError as e:
        raise InputError(f"classifier {name}: {e} ({source})") from None
    if torch.equal(index, torch.arange(k)):
        return model
    return ClassColumns(model, index)


def trained_subset(models: dict, data) -> list[int] | None:
    """The class indices of ``data`` to score when the classifiers were trained on a subset of its classes
    (``diffaug train --classes``; ``model.json`` records ``class_indices`` and ``data``), so that such a classifier
    is evaluated on the classes it knows of its own data; None when no classifier records a subset of ``data``.

    Raises:
        InputError: the classifiers were trained on different subsets (or some on all classes) of ``data``.
    """
    def same_data(spec) -> bool:
        recorded = spec.get("data")
        return recorded is not None and (str(recorded) == str(data) or
                                         Path(str(recorded)).resolve() == Path(str(data)).resolve())

    subsets = {name: tuple(m.spec.get("class_indices") or ()) for name, m in models.items() if same_data(m.spec)}
    if not any(subsets.values()):
        return None
    if len(set(subsets.values())) > 1 or len(subsets) != len(models):
        raise InputError("the classifiers were trained on different classes of " + str(data) + " ("
                         + ", ".join(f"{n}: {list(c) or 'all'}" for n, c in subsets.items())
                         + "; diffaug train --classes); evaluate the classifiers of one class subset at a time")
    return list(next(iter(subsets.values())))


def check_denoiser_on(den, images: torch.Tensor, source: str, alternative: str = "") -> None:
    """:meth:`~diffaug.Denoiser.check_images` on a probe batch of the evaluation set, except that a denoiser of
    other channels (the digits default on RGB images, say) is named with the CLI's fix: a denoiser trained on this
    data (``alternative``: another way out, e.g. evaluating without one)."""
    if images.shape[1] != den.channels:
        raise InputError(f"the denoiser takes {den.channels}-channel images but {source} has {images.shape[1]}; "
                         f"pass --denoiser a model trained on this data (`diffaug train-diffusion --data DIR`)"
                         + (f" {alternative}" if alternative else ""))
    den.check_images(images, name=f"images of {source}")


def as_float(image: torch.Tensor) -> torch.Tensor:
    """A decoded ``uint8`` image as float in [0, 1], at its own size (no classifier input size recorded)."""
    return image.float().div(255) if image.dtype == torch.uint8 else image


def eval_view(source, size: int | None, *, whole: bool = False):
    """``source`` (a lazy source or any dataset of ``(image, label)``) seen through the evaluation transform at
    ``size``, or as it is when ``size`` is None. ``whole=True``: the whole image brought to ``size`` (``Resize(size)``
    + ``CenterCrop(size)``, no zoom), as images that an in-memory set (digits, CIFAR-10) holds at the classifier's
    size are seen, so that an OOD set next to such an ID set gets the same pre-processing (OpenOOD's for CIFAR)."""
    from ..data import SeededView, eval_transform, generative_transform

    if size is None:
        return SeededView(source, as_float)
    return SeededView(source, generative_transform(size, flip=False) if whole else eval_transform(size))


def batches(dataset, batch_size: int, *, workers: int | None = 0, indices=None, what: str = "the data"
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` batches of ``dataset`` (items ``indices`` in that order, default all), read by a
    DataLoader with ``workers`` processes; only the batches in flight are held in memory."""
    from torch.utils.data import Subset

    from ..data import make_loader

    data = dataset if indices is None else Subset(dataset, [int(i) for i in indices])
    try:
        for x, y, *_ in make_loader(data, batch_size, workers=workers):
            yield x, y
    except RuntimeError as e:
        if "stack expects each tensor to be equal size" not in str(e):
            raise
        raise InputError(f"the images of {what} differ in size and the classifier records no input size "
                         "(a model.json from before it was recorded); pass --image-size N") from None


def probe(dataset) -> torch.Tensor:
    """The first item's image as a batch of one (for shape checks before any work)."""
    return dataset[0][0][None]


def chunks(images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """In-memory images and labels as consecutive batches of ``batch_size`` (the last one shorter)."""
    for start in range(0, images.shape[0], batch_size):
        yield images[start : start + batch_size], labels[start : start + batch_size]


def open_eval_folder(data, models: dict, *, channels: int = 3, on_bad_file: str = "error", verbose: bool = False):
    """The labelled images of folder ``data`` to evaluate on, lazily: the test split when ``data`` holds split
    folders (``test/``, else ``val/``) or is the single folder a classifier was trained on (the same 20 % that
    ``diffaug train`` held out, so no training image is scored); any other class folder whole (ImageNet-R, -A,
    -Sketch, -V2, ...)."""
    from pathlib import Path

    from ..data import open_folder, open_splits, split_layout

    root = Path(data)
    trained_on = {Path(str(m.spec.get("data"))).resolve() for m in models.values() if m.spec.get("data")}
    if split_layout(root) == "splits" or root.resolve() in trained_on:
        test = open_splits(root, channels=channels, on_bad_file=on_bad_file)["test"]
        how = "its test split"
    else:
        test = open_folder(root, channels=channels, on_bad_file=on_bad_file)
        how = "the whole folder (an evaluation set)"
    if verbose:
        print(f"data: {root}: {how}: {len(test)} images, {test.num_classes} classes")
    return test
