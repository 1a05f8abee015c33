"""In-memory datasets: images float ``[N, C, H, W]`` in [0, 1], labels LongTensor ``[N]``.

These are the small sources whose numbers the study depends on; they compute exactly what ``diffaug.data``
computed before it became a package. :class:`ImageDataset` is also a ``torch.utils.data.Dataset`` (items
``(image [C, H, W], label)``), the same interface as the lazy on-disk sources in :mod:`diffaug.data.files`.

* ``digits``: scikit-learn's bundled handwritten digits (1797 images, 8x8, gray levels 0..16 scaled to [0, 1]).
  The split is fixed: stratified 70 / 10 / 20 % train / val / test (1257 / 180 / 360 images) with
  ``sklearn.model_selection.train_test_split(..., random_state=0)``, val and test cut from the held-out 30 %.
* CIFAR-10 from a local folder (binary or python layout, see :func:`load_cifar10`).
* an image folder ``ROOT/<class>/<image>`` read whole into memory: classes are the sorted sub-folder names; all
  images must share one size and mode (gray -> 1 channel, anything else -> RGB). A single folder gives all its
  images for every split here (as before); the streaming layer (:func:`diffaug.data.open_splits`) splits it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass
class ImageDataset(torch.utils.data.Dataset):
    """Images ``[N, C, H, W]`` float32 in [0, 1], labels ``[N]`` int64 and the class names.

    Indexing gives ``(images[i], int(labels[i]))``, as the lazy sources do.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def digits_split_indices() -> dict[str, np.ndarray]:
    """The fixed train / val / test indices into ``sklearn.datasets.load_digits()``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    y = load_digits().target
    idx = np.arange(len(y))
    train, rest = train_test_split(idx, test_size=0.3, stratify=y, random_state=0)
    val, test = train_test_split(rest, test_size=2 / 3, stratify=y[rest], random_state=0)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def load_digits(split: str = "train") -> ImageDataset:
    """The embedded default: scikit-learn's 8x8 digits, one fixed split, images in [0, 1]."""
    from sklearn.datasets import load_digits as sk_load_digits

    if split not in SPLITS + ("all",):
        raise InputError(f"unknown split {split!r}; use one of {', '.join(SPLITS)} or 'all'")
    bunch = sk_load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    if split != "all":
        keep = torch.from_numpy(digits_split_indices()[split])
        images, labels = images[keep], labels[keep]
    return ImageDataset(images.contiguous(), labels, [str(i) for i in range(10)])


def load_image_folder(root: str | os.PathLike) -> ImageDataset:
    """Read ``root/<class>/<image>`` into memory. Unreadable files raise an error naming the file."""
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.is_dir():
        raise InputError(f"data folder {root} does not exist; pass 'digits' or a folder of class sub-folders")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InputError(f"data folder {root} has no class sub-folders; lay it out as {root}/<class>/<image>.png")
    arrays, labels, first = [], [], None
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for path in files:
            try:
                with Image.open(path) as im:
                    im.load()
                    mode = "L" if im.mode in ("L", "1", "I;16", "I") else "RGB"
                    arr = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
            except (UnidentifiedImageError, OSError, ValueError) as e:
                raise InputError(f"cannot read image {path}: {e}; remove or replace the file") from None
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            if first is None:
                first = (path, arr.shape)
            elif arr.shape != first[1]:
                raise InputError(
                    f"image {path} has shape {arr.shape} (C, H, W) but {first[0]} has {first[1]}; "
                    "resize all images to one size and mode"
                )
            arrays.append(arr)
            labels.append(label)
    if not arrays:
        raise InputError(f"data folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images = torch.from_numpy(np.stack(arrays))
    return ImageDataset(images, torch.tensor(labels, dtype=torch.long), classes)


def is_cifar10_root(root: str | os.PathLike) -> bool:
    """Whether ``root`` is (or holds) an extracted CIFAR-10 folder."""
    root = Path(root)
    return any((root / d).is_dir() for d in ("cifar-10-batches-bin", "cifar-10-batches-py")) or root.name.startswith(
        "cifar-10-batches")


def is_in_memory(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` names an in-memory source of fixed size (``digits`` or CIFAR-10) rather than a folder
    of images to stream."""
    return str(spec) == "digits" or is_cifar10_root(spec)


def load_dataset(spec: str | os.PathLike, split: str = "train") -> ImageDataset:
    """``"digits"`` (one of its fixed splits) or an image folder (``split`` selects ``spec/split`` if present).
    CIFAR-10 has a train and a test split only, as torchvision's ``CIFAR10``: its ``"val"`` is the train split (so
    ``val_acc`` of a CIFAR-10 classifier is its accuracy on training images, and eval-ood fits ReAct's threshold
    on training images, as the ReAct paper does)."""
    if str(spec) == "digits":
        return load_digits(split)
    root = Path(spec)
    if is_cifar10_root(root):
        return load_cifar10(root, "test" if split == "test" else "train")
    if (root / split).is_dir():
        root = root / split
    return load_image_folder(root)


# ---------------------------------------------------------------------- CIFAR-10 from local disk
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


class _PlainDataUnpickler:
    """Unpickles only plain data: containers, numbers, strings and NumPy arrays (nothing callable beyond
    NumPy's array reconstruction), so a tampered CIFAR file cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"), ("codecs", "encode"),
    }

    @classmethod
    def load(cls, path: Path):
        import pickle

        allowed = cls.ALLOWED

        class Restricted(pickle.Unpickler):
            def find_class(self, module, name):
                if (module, name) in allowed:
                    return super().find_class(module, name)
                raise InputError(f"{path} holds a pickled object {module}.{name}, which is refused (only plain "
                                 "data is unpickled); use the official CIFAR-10 files or the binary layout")

        with open(path, "rb") as f:
            try:
                return Restricted(f, encoding="bytes").load()
            except InputError:
                raise
            except Exception as e:
                raise InputError(f"cannot read {path}: {e}; the file is damaged") from None


def load_cifar10(root: str | os.PathLike, split: str = "train") -> ImageDataset:
    """CIFAR-10 from a local folder in the binary layout (``cifar-10-batches-bin``, read with NumPy) or the
    python layout (``cifar-10-batches-py``, read with a restricted unpickler). ``root`` may be either folder
    or their parent. Images ``[N, 3, 32, 32]`` in [0, 1]."""
    if split not in ("train", "test"):
        raise InputError(f"CIFAR-10 has splits 'train' and 'test', got {split!r}")
    root = Path(root)
    for folder, kind in ((root / "cifar-10-batches-bin", "bin"), (root / "cifar-10-batches-py", "py"),
                         (root, "bin" if root.name.endswith("bin") else "py")):
        names = _CIFAR_FILES[split]
        files = [folder / (n + ".bin" if kind == "bin" else n) for n in names]
        if all(f.is_file() for f in files):
            break
    else:
        raise InputError(f"no CIFAR-10 {split} files under {root}; expected cifar-10-batches-bin/ or "
                         "cifar-10-batches-py/ as extracted from the official archives")
    images, labels = [], []
    for f in files:
        if kind == "bin":
            raw = np.fromfile(f, dtype=np.uint8)
            if raw.size % 3073:
                raise InputError(f"{f} has {raw.size} bytes, not a multiple of 3073; the file is truncated")
            raw = raw.reshape(-1, 3073)
            labels.append(raw[:, 0].astype(np.int64))
            images.append(raw[:, 1:].reshape(-1, 3, 32, 32))
        else:
            batch = _PlainDataUnpickler.load(f)
            if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
                raise InputError(f"{f} is not a CIFAR-10 batch (no data/labels); use the official files")
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    x = torch.from_numpy(np.concatenate(images).astype(np.float32) / 255.0)
    return ImageDataset(x, torch.from_numpy(np.concatenate(labels)), list(CIFAR10_CLASSES))


def subset_classes(ds: ImageDataset, classes: list[int]) -> ImageDataset:
    """Keep only ``classes`` (indices into ``ds.classes``), relabelled 0..k-1 in the given order."""
    if len(set(classes)) != len(classes) or len(classes) < 2:
        raise InputError(f"give at least two distinct classes, got {classes}")
    bad = [c for c in classes if not 0 <= c < ds.num_classes]
    if bad:
        raise InputError(f"classes {bad} do not exist; this data has classes 0..{ds.num_classes - 1}")
    remap = torch.full((ds.num_classes,), -1, dtype=torch.long)
    remap[torch.tensor(classes)] = torch.arange(len(classes))
    keep = remap[ds.labels] >= 0
    return ImageDataset(ds.images[keep], remap[ds.labels[keep]], [ds.classes[c] for c in classes])


# ---------------------------------------------------------------------- OOD sets for the embedded default
FAR_OOD_SETS = ("photo-patches", "noise")


def photo_patches(size: int = 8, channels: int = 1, scale: int = 8) -> torch.Tensor:
    """Real photographs at the digits' size: scikit-learn's two bundled sample photos (``china.jpg``,
    ``flower.jpg``, 427 x 640), downscaled ``scale`` times by area averaging, converted to gray for 1 channel, cut
    into non-overlapping ``size`` x ``size`` patches. Fixed (no randomness); about 2 x 96 patches at the defaults.

    Patches too large for the downscaled photos (``size > 427 // scale``, e.g. 54 px and more at the default
    scale) are cut at a lower scale, ``max(1, 427 // (4 * size))`` (several patches per photo where its size
    allows); a patch larger than the photos takes the whole photo resized (antialiased) so that its shorter side
    is ``size``. Smaller patches are cut exactly as before."""
    from sklearn.datasets import load_sample_images

    patches = []
    for img in load_sample_images().images:
        x = torch.from_numpy(img.astype(np.float32) / 255).permute(2, 0, 1)[None]
        if channels == 1:
            x = (x * torch.tensor([0.299, 0.587, 0.114]).reshape(1, 3, 1, 1)).sum(1, keepdim=True)
        short = min(x.shape[-2:])
        if short < size:
            from torchvision.transforms.v2.functional import resize

            x = resize(x, size, antialias=True)
        short = min(x.shape[-2:])
        x = torch.nn.functional.avg_pool2d(x, scale if short // scale >= size else max(1, short // (4 * size)))
        p = x.unfold(2, size, size).unfold(3, size, size)  # [1, C, h, w, size, size]
        patches.append(p.permute(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1], size, size))
    return torch.cat(patches).clamp(0, 1)


def noise_images(n: int = 200, size: int = 8, channels: int = 1, seed: int = 0) -> torch.Tensor:
    """Synthetic far-OOD: half uniform noise, half blurred Gaussian blobs, seeded and fixed."""
    g = torch.Generator().manual_seed(seed)
    uniform = torch.rand(n // 2, channels, size, size, generator=g)
    blobs = torch.randn(n - n // 2, channels, size, size, generator=g)
    blobs = torch.nn.functional.avg_pool2d(blobs, 3, stride=1, padding=1, count_include_pad=False)
    blobs = (blobs - blobs.amin((1, 2, 3), keepdim=True)) / (blobs.amax((1, 2, 3), keepdim=True)
                                                            - blobs.amin((1, 2, 3), keepdim=True))
    return torch.cat([uniform, blobs])


# ---------------------------------------------------------------------- pre-corrupted benchmarks from local disk
CORRUPTED_LAYOUTS = ("cifar10-c", "imagenet-c")


def corrupted_layout(root: str | os.PathLike) -> str | None:
    """``"cifar10-c"`` (``NAME.npy`` + ``labels.npy``), ``"imagenet-c"`` (``corruption/severity/class/image``)
    or None when ``root`` is neither (an ordinary dataset)."""
    root = Path(root)
    if not root.is_dir():
        return None
    if (root / "labels.npy").is_file():
        return "cifar10-c"
    if any(p.is_dir() and any((p / str(s)).is_dir() for s in range(1, 6)) for p in root.iterdir()):
        return "imagenet-c"
    return None


def corrupted_names(root: str | os.PathLike) -> tuple[str, ...]:
    """The corruptions a pre-corrupted folder holds (sorted)."""
    root = Path(root)
    layout = corrupted_layout(root)
    if layout == "cifar10-c":
        return tuple(sorted(p.stem for p in root.glob("*.npy") if p.stem != "labels"))
    if layout == "imagenet-c":
        return tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")))
    found = sorted(p.name for p in root.iterdir())[:6] if root.is_dir() else "nothing (no such folder)"
    raise InputError(f"{root} is neither CIFAR-10-C (NAME.npy files + labels.npy) nor ImageNet-C "
                     f"(corruption/severity/class/image) shaped; found {found}")


def load_corrupted(root: str | os.PathLike, corruption: str, severity: int) -> ImageDataset:
    """One (corruption, severity) of a pre-corrupted benchmark on local disk.

    * CIFAR-10-C: ``root/<corruption>.npy`` (uint8 ``[5 n, H, W, 3]``, severities 1..5 in blocks of n) and
      ``root/labels.npy``; read with ``allow_pickle=False``. Classes are CIFAR-10's.
    * ImageNet-C: ``root/<corruption>/<severity>/<class>/<image>`` (classes: sorted folder names).
    """
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        raise InputError(f"severity must be a whole number in 1..5, got {severity!r}")
    root = Path(root)
    layout = corrupted_layout(root)
    if layout is None:
        corrupted_names(root)  # raises the layout error
    if corruption not in corrupted_names(root):
        raise InputError(f"{root} has no corruption {corruption!r}; it holds {', '.join(corrupted_names(root))}")
    if layout == "imagenet-c":
        folder = root / corruption / str(severity)
        if not folder.is_dir():
            raise InputError(f"{folder} is missing: ImageNet-C layout is corruption/severity/class/image, "
                             "severities 1..5")
        return load_image_folder(folder)
    try:
        labels = np.load(root / "labels.npy", allow_pickle=False)
        data = np.load(root / f"{corruption}.npy", mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise InputError(f"cannot read {root}/{corruption}.npy or labels.npy: {e}; use the official files") from None
    if data.ndim != 4 or data.shape[-1] != 3 or data.dtype != np.uint8 or data.shape[0] % 5:
        raise InputError(f"{root}/{corruption}.npy has shape {data.shape} {data.dtype}; CIFAR-10-C files are uint8 "
                         "[5 n, H, W, 3] (five severities of n images)")
    n = data.shape[0] // 5
    if labels.shape[0] not in (n, 5 * n):
        raise InputError(f"{root}/labels.npy has {labels.shape[0]} labels for {n} images per severity")
    block = slice((severity - 1) * n, severity * n)
    images = torch.from_numpy(np.ascontiguousarray(data[block]).astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    y = torch.from_numpy(np.asarray(labels[block] if labels.shape[0] == 5 * n else labels, dtype=np.int64))
    classes = list(CIFAR10_CLASSES) if int(y.max()) < 10 else [str(i) for i in range(int(y.max()) + 1)]
    return ImageDataset(images.contiguous(), y, classes)
