"""Image transforms (torchvision's v2 API) and per-sample seeding.

* training: ``RandomResizedCrop(size)`` + ``RandomHorizontalFlip()``;
* evaluation: ``Resize(round(size / 0.875))`` + ``CenterCrop(size)`` (ImageNet's 224 / 256);
* generative training (``train-diffusion``): ``Resize(size)`` + ``CenterCrop(size)`` + horizontal flip (the whole
  image, no random crop);

all on the decoded ``uint8`` image, ending in ``ToDtype(float32, scale=True)`` (values in [0, 1]).
``library="timm"`` builds the train / eval transforms with timm's ``create_transform`` instead (its
``RandomResizedCrop`` + flip and its ``Resize`` + ``CenterCrop`` at crop fraction 0.875, colour jitter off, no
normalisation: the networks get [0, 1] images either way).

The random crop and flip of a sample are a function of ``(seed, epoch, index)`` only (:func:`sample_seed`), so
they do not depend on the number of workers, on the rank, or on where a resumed run started: torchvision's v2
transforms draw their parameters from the global RNG, so :class:`SeededView` runs each sample's transform under
a private seed (:func:`diffaug.utils.seeding.private_cpu_seed`, which restores the caller's RNG afterwards).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError
from ..utils.seeding import private_cpu_seed

EVAL_CROP_FRACTION = 0.875
TRANSFORM_LIBRARIES = ("torchvision", "timm")


def check_size(size: int) -> int:
    """``size`` as an int >= 1, else a one-line error."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise InputError(f"image size must be a whole number >= 1, got {size!r}")
    return int(size)


def check_library(library: str) -> str:
    """``library`` if it is one of :data:`TRANSFORM_LIBRARIES`, else a one-line error."""
    if library not in TRANSFORM_LIBRARIES:
        raise InputError(f"unknown transform library {library!r}; use one of {', '.join(TRANSFORM_LIBRARIES)}")
    return library


class _TimmTransform:
    """timm's ``create_transform`` pipeline (PIL in, tensor in [0, 1] out) on a ``uint8 [C, H, W]`` tensor."""

    def __init__(self, size: int, is_training: bool):
        from timm.data import create_transform

        from torchvision.transforms import v2

        self.transform = create_transform(size, is_training=is_training, color_jitter=None, interpolation="bilinear",
                                          crop_pct=EVAL_CROP_FRACTION, normalize=False)
        self.to_float = v2.ToDtype(torch.float32, scale=True)

    def __call__(self, image):
        from torchvision.transforms.v2.functional import to_pil_image

        from ..utils.seeding import private_python_seed

        # timm's random crop draws from Python's `random`: give it a private state drawn from torch's CPU RNG
        # (which SeededView seeds per sample)
        with private_python_seed(int(torch.randint(0, 2**62, (1,)))):
            out = self.transform(to_pil_image(image) if isinstance(image, torch.Tensor) else image)
        return self.to_float(out)  # timm without normalisation ends in uint8

    def __repr__(self) -> str:
        return f"timm:{self.transform!r}"


def train_transform(size: int, library: str = "torchvision"):
    """``RandomResizedCrop(size)`` + horizontal flip on a ``uint8`` image, then float in [0, 1]
    (torchvision's v2 API, or timm's ``create_transform(size, is_training=True)`` with ``library="timm"``)."""
    from torchvision.transforms import v2

    size = check_size(size)
    if check_library(library) == "timm":
        return _TimmTransform(size, is_training=True)
    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(),
                       v2.ToDtype(torch.float32, scale=True)])


def eval_transform(size: int, library: str = "torchvision"):
    """``Resize(round(size / 0.875))`` (shorter side) + ``CenterCrop(size)``, then float in [0, 1]
    (torchvision's v2 API, or timm's ``create_transform(size, crop_pct=0.875)`` with ``library="timm"``)."""
    from torchvision.transforms import v2

    size = check_size(size)
    if check_library(library) == "timm":
        return _TimmTransform(size, is_training=False)
    return v2.Compose([v2.ToImage(), v2.Resize(round(size / EVAL_CROP_FRACTION), antialias=True),
                       v2.CenterCrop(size), v2.ToDtype(torch.float32, scale=True)])


def generative_transform(size: int, flip: bool = True):
    """``Resize(size)`` (shorter side) + ``CenterCrop(size)`` (+ a random horizontal flip), then float in [0, 1]:
    the whole image, as a diffusion model (or a guidance classifier) is trained on it."""
    from torchvision.transforms import v2

    size = check_size(size)
    return v2.Compose([v2.ToImage(), v2.Resize(size, antialias=True), v2.CenterCrop(size),
                       *([v2.RandomHorizontalFlip()] if flip else []), v2.ToDtype(torch.float32, scale=True)])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's random transform, mixed from ``(seed, epoch, index)`` by NumPy's
    ``SeedSequence`` (distinct inputs give unrelated streams)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class SeededView(torch.utils.data.Dataset):
    """A source seen through transforms, each sample's randomness a function of ``(seed, epoch, index)``.

    Items are addressed by ``index`` (epoch 0) or by an ``(epoch, index)`` pair, which is what
    :class:`diffaug.data.loader.ResumableSampler` yields, so persistent workers need no epoch bookkeeping.

    Args:
        source: a dataset with ``read(index) -> (uint8 image [C, H, W], label)`` (the lazy sources), or any
            dataset of ``(image, label)`` (e.g. in-memory float images; the transforms accept tensors).
        transforms: one or more transforms; item ``(x0, x1, ..., label)`` gives each view of the same
            decoded image (e.g. a random crop for the loss and the center view for DiffAug).
        seed: the run's seed.
        count_skips: append to each item how many unreadable files were replaced to get it (see
            :class:`~diffaug.data.files.ImageFiles`' ``on_bad_file``), so a training loop can count them exactly.
        aligned: sources with the same items as ``source`` (e.g. :func:`~diffaug.data.files.aligned_copy`):
            the item gains, after the views, each one's image through the first transform with the same random
            draws as the first view (the same crop and flip of the aligned copy).
    """

    def __init__(self, source, *transforms, seed: int = 0, count_skips: bool = False, aligned=()):
        if not transforms:
            raise InputError("SeededView needs at least one transform")
        self.source = source
        self.transforms = transforms
        self.seed = int(seed)
        self.count_skips = count_skips
        self.aligned = tuple(aligned)

    def __len__(self) -> int:
        return len(self.source)

    def __getattr__(self, name):  # classes, num_classes, channels, bad_files_skipped... of the source
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        if hasattr(self.source, "read_counted"):
            image, label, skips = self.source.read_counted(index)
        else:
            read = getattr(self.source, "read", None)
            (image, label), skips = (read(index) if read is not None else self.source[index]), 0
        views = []
        for k, transform in enumerate(self.transforms):
            with private_cpu_seed(sample_seed(self.seed + k, epoch, index)):
                views.append(transform(image))
        for copy in self.aligned:  # the item actually read (index + skips), with the first view's draws
            with private_cpu_seed(sample_seed(self.seed, epoch, index)):
                views.append(self.transforms[0](copy.read((index + skips) % len(copy))[0]))
        return (*views, label, skips) if self.count_skips else (*views, label)
