"""Lazy on-disk sources: every image is decoded when its item is read, never the whole set at once.

Layouts (each detected from the folder; a one-line :class:`~diffaug.InputError` names what was expected):

* ``ROOT/<class>/<image>``: images of any size and mode (gray, palette, alpha, CMYK are converted to RGB, or to
  one gray channel with ``channels=1``). Classes are the sub-folder names in sorted order, except that folders
  named only by digits (ImageNet-V2: ``0`` .. ``999``) are class indices in numeric order.
* ``ROOT/train`` + ``ROOT/val`` (+ ``ROOT/test``): ImageNet's split folders, classes matched by folder name.
  A single ``ROOT/<class>`` folder is instead split deterministically (per class) into train / val / test
  without overlap (:func:`split_indices`).
* ImageNet-R / -A / -Sketch: ordinary class folders named by WordNet id; :func:`class_index_map` maps them to a
  classifier's classes and :func:`restrict_logits` keeps a 1000-class classifier's logits of those classes.
* OpenOOD image lists (``relative/path label`` per line, with a root folder): :class:`ImageList`.
* OOD sets that need no classes: a flat folder of images, or a texture-style ``images/<class>/`` root
  (:func:`open_unlabelled`, label -1).
* ImageNet-C ``corruption/severity/class/image``: :func:`open_corrupted`, one condition at a time.

A source's item is ``(image float [C, H, W] in [0, 1], label)``; :meth:`ImageFiles.read` gives the decoded
``uint8`` image for the transforms (:mod:`diffaug.data.transforms`).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from .memory import IMAGE_SUFFIXES, SPLITS

BAD_FILE_POLICIES = ("error", "skip")
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)  # train / val / test of a single class folder, as the digits' split
_DECODE_ERRORS = (OSError, ValueError, SyntaxError)  # PIL's UnidentifiedImageError is an OSError


_NAMED_BAD_FILES: set[str] = set()  # the unreadable files this process has named (ImageFiles.read_counted)


class BadImageError(InputError):
    """A file that cannot be decoded as an image (truncated, not an image, unsupported)."""


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def decode_image(path: str | os.PathLike, channels: int = 3):
    """Decode one image file with PIL into mode RGB (``channels=3``) or L (``channels=1``).

    Palette images with transparency and images with alpha lose their alpha channel (as torchvision's
    ``ImageFolder`` loader does); CMYK, 16-bit and 1-bit images are converted by PIL.

    Raises:
        BadImageError: the file is truncated, empty or not an image (the message names the file).
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
            if im.mode in ("I;16", "I;16B", "I;16L", "I") and channels == 1:
                arr = np.asarray(im, dtype=np.float32)
                return Image.fromarray((arr / (65535.0 if arr.max() > 255 else 255.0) * 255).round()
                                       .clip(0, 255).astype(np.uint8), "L")
            return im.convert("L" if channels == 1 else "RGB")
    except _DECODE_ERRORS as e:
        raise BadImageError(f"cannot read image {path}: {e}; remove or replace the file (--on-bad-file skip of "
                            "train, eval-shift, eval-ood and certify, and the Python loaders' on_bad_file='skip', "
                            "skip such files)") from None


def holds_colour(path: str | os.PathLike) -> bool | None:
    """Whether an image file holds colour (channels that differ, on a 32 x 32 reduction); None if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"):
                return False
            im.draft("RGB", (64, 64))  # JPEG: decode at a reduced scale
            rgb = np.asarray(im.convert("RGB").resize((32, 32)), dtype=np.int16)
    except _DECODE_ERRORS:
        return None
    return bool((np.abs(rgb - rgb.mean(axis=2, keepdims=True)) > 8).mean() > 0.01)


def check_colour_kept(files: "ImageFiles", channels: int, data, n: int = 32) -> None:
    """One-line :class:`InputError` when a model that takes ``channels = 1`` (a gray denoiser, the digits default
    among them) would read a folder of colour images as grayscale: most of a spread sample of ``n`` files hold
    colour. Gray images read as RGB lose nothing, so ``channels = 3`` always passes."""
    if channels != 1 or not len(files):
        return
    step = max(1, len(files) // n)
    found = [c for c in (holds_colour(str(files._paths[i])) for i in range(0, len(files), step)[:n]) if c is not None]
    if found and sum(found) > len(found) / 2:
        raise InputError(f"{data} holds colour images but the denoiser takes 1-channel images (the digits default, "
                         f"say): they would be read as grayscale; pass --denoiser a model trained on this data "
                         f"(`diffaug train-diffusion --data {data}`)")


def _pil_to_uint8(im) -> torch.Tensor:
    from torchvision.transforms.v2.functional import pil_to_tensor

    return pil_to_tensor(im)


def class_folders(root: Path) -> list[str]:
    """Sub-folder names of ``root`` that are classes: sorted, or in numeric order when all are numbers
    (ImageNet-V2's ``0`` .. ``999`` are class indices)."""
    names = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if names and all(n.isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _images_under(folder: Path) -> list[Path]:
    """Image files under ``folder`` at any depth, sorted (deterministic across machines); symlinked folders are
    followed (as torchvision's ``make_dataset``: OOD collections are often assembled from links), hidden ones
    skipped."""
    found, seen = [], set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:  # a link back to a folder already read (a loop, or two links to one folder): once only
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(top, f) for f in files if not f.startswith(".") and is_image(Path(top, f))]
    return sorted(p for p in found if p.is_file())


class ImageFiles(torch.utils.data.Dataset):
    """A list of ``(path, label)`` read lazily: item ``i`` decodes file ``i``.

    Args:
        samples: ``(path, label)`` pairs; label -1 for unlabelled (OOD) images.
        classes: the class names (index = label).
        channels: 3 (RGB) or 1 (gray).
        on_bad_file: ``"error"`` (default: stop with an :class:`InputError` naming the file) or ``"skip"``
            (substitute the next readable index, ``i + 1``, ``i + 2``, ... deterministically; each bad file is
            named on stderr once per process, and each substitution, every time the file is drawn, is counted in
            :attr:`bad_files_skipped`, shared by the loader's workers).
        root: the folder the samples came from (for messages).
    """

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], *, channels: int = 3,
                 on_bad_file: str = "error", root: str | os.PathLike | None = None):
        if channels not in (1, 3):
            raise InputError(f"channels must be 1 or 3, got {channels}")
        if on_bad_file not in BAD_FILE_POLICIES:
            raise InputError(f"on_bad_file must be one of {', '.join(BAD_FILE_POLICIES)}, got {on_bad_file!r}")
        if not samples:
            raise InputError(f"{root or 'the dataset'} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        # NumPy arrays, not a list of Python tuples: worker processes forked from this one then share the pages
        # (a list's reference counts would copy them into every worker as they are read)
        self._paths = np.array([str(p) for p, _ in samples])
        self._labels = np.array([int(y) for _, y in samples], dtype=np.int64)
        self.classes = list(classes)
        self.channels = channels
        self.on_bad_file = on_bad_file
        self.root = None if root is None else str(root)
        self._skipped = multiprocessing.get_context().Value("q", 0)

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def samples(self) -> list[tuple[str, int]]:
        """All ``(path, label)`` pairs (a new list)."""
        return list(zip(self._paths.tolist(), self._labels.tolist()))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labels(self) -> torch.Tensor:
        """All labels ``[N]`` (no image is decoded)."""
        return torch.from_numpy(self._labels.copy())

    @property
    def bad_files_skipped(self) -> int:
        """How many times an unreadable file was replaced by the next index (all workers, this process's
        loaders; includes items the loader has prefetched)."""
        return int(self._skipped.value)

    def read_counted(self, index: int) -> tuple[torch.Tensor, int, int]:
        """Item ``index`` as a ``uint8 [C, H, W]`` tensor, its label, and how many unreadable files were
        replaced to get it (0 unless ``on_bad_file="skip"`` met a bad file)."""
        n = len(self)
        for k in range(n if self.on_bad_file == "skip" else 1):
            path, label = str(self._paths[(index + k) % n]), int(self._labels[(index + k) % n])
            try:
                return _pil_to_uint8(decode_image(path, self.channels)), label, k
            except BadImageError as e:
                if self.on_bad_file == "error":
                    raise
                with self._skipped.get_lock():
                    self._skipped.value += 1
                if path not in _NAMED_BAD_FILES:  # once per process: the file is drawn again each epoch
                    _NAMED_BAD_FILES.add(path)
                    print(f"data: skipped unreadable {path} ({e.args[0].split(': ', 1)[-1].split(';')[0]}); "
                          f"using item {(index + k + 1) % n} instead (said once per process)", file=sys.stderr)
        raise InputError(f"no readable image in {self.root or 'the dataset'}; every file failed to decode")

    def read(self, index: int) -> tuple[torch.Tensor, int]:
        """Item ``index`` as a ``uint8 [C, H, W]`` tensor and its label (input of the v2 transforms)."""
        x, label, _ = self.read_counted(index)
        return x, label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x, label = self.read(index)
        return x.float().div_(255), label

    def subset(self, indices) -> "ImageFiles":
        """The items at ``indices`` (in that order), same classes and settings."""
        indices = np.asarray(indices, dtype=np.int64)
        return ImageFiles(list(zip(self._paths[indices].tolist(), self._labels[indices].tolist())), self.classes,
                          channels=self.channels, on_bad_file=self.on_bad_file, root=self.root)

    def with_classes(self, classes: list[int]) -> "ImageFiles":
        """Only the items of ``classes`` (indices into :attr:`classes`), relabelled 0..k-1 in the given order."""
        if len(set(classes)) != len(classes) or len(classes) < 2:
            raise InputError(f"give at least two distinct classes, got {classes}")
        bad = [c for c in classes if not 0 <= c < self.num_classes]
        if bad:
            raise InputError(f"classes {bad} do not exist; this data has classes 0..{self.num_classes - 1}")
        new = {c: i for i, c in enumerate(classes)}
        return ImageFiles([(p, new[y]) for p, y in self.samples if y in new], [self.classes[c] for c in classes],
                          channels=self.channels, on_bad_file=self.on_bad_file, root=self.root)

    def __repr__(self) -> str:
        return f"ImageFiles({self.root}, {len(self)} images, {self.num_classes} classes, {self.channels} ch)"


# ---------------------------------------------------------------------- class folders and split layouts
def open_folder(root: str | os.PathLike, *, channels: int = 3, on_bad_file: str = "error",
                classes: list[str] | None = None, allow_empty: bool = False) -> ImageFiles:
    """``root/<class>/<image>`` as a lazy source (images at any depth below a class folder).

    Args:
        root: the folder.
        channels: 3 (RGB) or 1 (gray).
        on_bad_file: see :class:`ImageFiles`.
        classes: use these class names in this order (labels follow it); every folder class must be among them.
            Default: the folder's own classes (:func:`class_folders`).
        allow_empty: accept class folders without images (an evaluation split may lack a class's images);
            default: refused, as torchvision's ``ImageFolder`` does (a class no image ever trains).
    """
    from torchvision.datasets.folder import make_dataset

    root = Path(root)
    if not root.is_dir():
        state = "is a file, not a folder" if root.exists() else "does not exist"
        raise InputError(f"data folder {root} {state}; pass a folder laid out as {root}/<class>/<image>")
    found = class_folders(root)
    if not found:
        loose = [p.name for p in root.iterdir() if p.is_file() and is_image(p)][:1]
        if loose and loose[0].startswith("ILSVRC2012_val_"):
            raise InputError(f"data folder {root} is ImageNet's flat validation folder ({loose[0]} ...): sort it into "
                             f"class folders {root}/<wnid>/<image> first (torchvision.datasets.ImageNet(root, "
                             "split='val') does it from the devkit; ImageNet's valprep.sh, or Kaggle's "
                             "LOC_val_solution.csv, names each file's class)")
        hint = (f" (it holds loose images such as {loose[0]}: an unlabelled OOD set goes to eval-ood --ood, or "
                "open_unlabelled in Python)" if loose else "")
        raise InputError(f"data folder {root} has no class sub-folders{hint}; lay it out as {root}/<class>/<image>")
    if split_layout(root) == "splits":
        raise InputError(f"{root} holds split folders (train/, val/ ...); open it with open_splits, or give "
                         f"{root / 'train'} as a class folder")
    if set(found) <= set(SPLITS):  # train/ alone, or val/ + test/: an incomplete split layout, not classes
        have = ", ".join(f"{c}/" for c in found)
        raise InputError(f"{root} holds {have} but not a split layout (train/ plus val/ or test/, each with class "
                         f"folders); add the missing split, or give {root / found[0]} as one folder to split")
    if classes is None:
        classes = found
    else:
        unknown = [c for c in found if c not in set(classes)]
        if unknown:
            raise InputError(f"{root} has classes the reference set lacks: {', '.join(unknown[:5])}"
                             f"{' ...' if len(unknown) > 5 else ''}; classes are matched by folder name")
    index = {c: i for i, c in enumerate(classes)}
    samples = make_dataset(str(root), {c: index[c] for c in found}, is_valid_file=lambda p: is_image(Path(p)),
                           allow_empty=True)  # no hidden files (e.g. macOS "._x.jpg" resource forks)
    samples = sorted(samples, key=lambda s: (s[1], s[0]))
    if not samples:
        raise InputError(f"data folder {root} holds no images in its class folders ({', '.join(IMAGE_SUFFIXES)})")
    if classes is found and not allow_empty:  # the folder's own classes: one no image ever trains
        empty = sorted(set(found) - {found[y] for _, y in samples})
        if empty:
            raise InputError(f"class folder {root / empty[0]} holds no images ({len(empty)} empty in all, as "
                             "torchvision's ImageFolder refuses); remove it or add its images")
    return ImageFiles(samples, classes, channels=channels, on_bad_file=on_bad_file, root=root)


def split_indices(labels, fractions: tuple[float, float, float] = SPLIT_FRACTIONS, seed: int = 0
                  ) -> dict[str, np.ndarray]:
    """Deterministic stratified train / val / test indices without overlap.

    Per class (labels in their order of appearance does not matter), its items are permuted by a generator
    seeded with ``(seed, class)``; the first ``round(n * val)`` go to val, the next ``round(n * test)`` to test
    and the rest (at least one) to train. Each index array is sorted.
    """
    labels = np.asarray(labels)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise InputError(f"split fractions must be three numbers >= 0 summing to 1, got {fractions}")
    out = {s: [] for s in SPLITS}
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(c))
        members = members[torch.randperm(len(members), generator=g).numpy()]
        n_val = min(int(round(len(members) * fractions[1])), len(members) - 1)
        n_test = min(int(round(len(members) * fractions[2])), len(members) - 1 - n_val)
        out["val"].append(members[:n_val])
        out["test"].append(members[n_val:n_val + n_test])
        out["train"].append(members[n_val + n_test:])
    return {s: np.sort(np.concatenate(v)).astype(np.int64) for s, v in out.items()}


def stratified_sample(labels, n: int, seed: int = 0) -> np.ndarray:
    """``n`` indices drawn without replacement, seeded, in proportion to the classes of ``labels`` (largest
    remainder: every class gets ``floor(n * share)`` and the classes with the largest remainders one more, ties
    to the lower label), each class's items permuted by a generator seeded with ``(seed, class)``. Sorted.
    All indices when ``n >= len(labels)``."""
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    quota = n * counts / counts.sum()
    take = np.floor(quota).astype(np.int64)
    extra = np.argsort(-(quota - take), kind="stable")[: n - int(take.sum())]
    take[extra] += 1
    picked = [np.random.default_rng([int(seed) & 0xFFFFFFFF, int(c) & 0xFFFFFFFF])
              .permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def split_layout(root: str | os.PathLike) -> str:
    """``"splits"`` when ``root`` holds ``train/`` and ``val/`` (ImageNet's layout), else ``"single"``."""
    root = Path(root)
    if (root / "train").is_dir() and ((root / "val").is_dir() or (root / "test").is_dir()):
        return "splits"
    return "single"


def open_splits(root: str | os.PathLike, *, channels: int = 3, on_bad_file: str = "error",
                fractions: tuple[float, float, float] = SPLIT_FRACTIONS, seed: int = 0,
                verbose: bool = False) -> dict[str, ImageFiles]:
    """Train / val / test sources of a folder.

    * ``root/train`` + ``root/val`` (+ ``root/test``): each its own class folder, with the same classes (a one-line
      error names the first classes one lacks). Without ``test/`` the test split is ``val/`` (ImageNet).
    * a single ``root/<class>/<image>`` folder: split per class by :func:`split_indices` (``fractions``,
      ``seed``), without overlap.

    Returns:
        ``{"train": ..., "val": ..., "test": ...}``; with ``verbose`` the sizes are printed.
    """
    root = Path(root)
    if split_layout(root) == "splits":
        parts = {s: root / s for s in SPLITS if (root / s).is_dir()}
        if "val" not in parts:
            parts["val"] = parts["test"]
        sets = {s: open_folder(p, channels=channels, on_bad_file=on_bad_file, allow_empty=s != "train")
                for s, p in parts.items()}  # a val / test split may lack a class's images
        ref = sets["train"].classes
        for s, d in sets.items():
            if d.classes != ref:
                missing = [c for c in ref if c not in set(d.classes)] or [c for c in d.classes if c not in set(ref)]
                side = f"{s} lacks" if [c for c in ref if c not in set(d.classes)] else "train lacks"
                raise InputError(f"{root}/train and {root}/{s} have different class sets ({side} "
                                 f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); give both the "
                                 "same class folders")
        sets.setdefault("test", sets["val"])
    else:
        whole = open_folder(root, channels=channels, on_bad_file=on_bad_file)
        idx = split_indices(whole.labels.numpy(), fractions, seed)
        empty = [s for s in SPLITS if len(idx[s]) == 0]
        if empty and fractions[SPLITS.index(empty[0])] <= 0:
            raise InputError(f"split fractions {fractions} leave no {empty[0]} images; give every split a positive "
                             "fraction")
        if empty:
            raise InputError(f"{root}: its {len(whole)} images are too few to split {fractions} (no {empty[0]} "
                             "images); add images, or lay it out as train/ + val/ (+ test/)")
        sets = {s: whole.subset(idx[s]) for s in SPLITS}
    if verbose:
        sizes = ", ".join(f"{s} {len(sets[s])}" for s in SPLITS)
        how = "split folders" if split_layout(root) == "splits" else f"one folder split {fractions} (seed {seed})"
        print(f"data: {root}: {how}: {sizes} images, {sets['train'].num_classes} classes")
    return sets


# ---------------------------------------------------------------------- aligned copies and extra training data
def aligned_copy(source: ImageFiles, root: str | os.PathLike) -> ImageFiles:
    """The files of ``source`` under another root with the same relative paths (DeepAugment's EDSR / CAE copies of
    a training set), same labels and order. ``root`` may hold the copy directly or, for a split layout, in
    ``root/train`` (or whatever split folder ``source`` came from).

    Raises:
        InputError: naming the first file the copy lacks (every file is checked, none decoded).
    """
    base, root = Path(source.root), Path(root)
    if not root.is_dir():
        raise InputError(f"aligned folder {root} does not exist; give a copy of the training set with the same "
                         "relative paths")
    target = root / base.name if base.name in SPLITS and (root / base.name).is_dir() else root
    samples = []
    for path, label in source.samples:
        copy = target / Path(path).relative_to(base)
        if not copy.is_file():
            raise InputError(f"aligned folder {root} lacks {copy.relative_to(root)} (the copy of {path}); every "
                             "training image needs its copy at the same relative path")
        samples.append((str(copy), label))
    return ImageFiles(samples, source.classes, channels=source.channels, on_bad_file=source.on_bad_file, root=target)


def with_extra(source: ImageFiles, root: str | os.PathLike) -> ImageFiles:
    """``source`` followed by the labelled images of ``root/<class>/<image>`` (or ``root/train/...``), classes
    matched by folder name (+Synth: synthetic images added to a training set). A class the training set lacks is
    a one-line error naming it."""
    root = Path(root)
    folder = root / "train" if split_layout(root) == "splits" else root
    extra = open_folder(folder, channels=source.channels, on_bad_file=source.on_bad_file, classes=source.classes)
    return ImageFiles(source.samples + extra.samples, source.classes, channels=source.channels,
                      on_bad_file=source.on_bad_file, root=source.root)


# ---------------------------------------------------------------------- image lists, OOD folders, ImageNet-C
class ImageList(ImageFiles):
    """An OpenOOD-style image list: each line ``relative/path label`` (label optional: -1), paths relative
    to ``root`` (default: the list's folder, as ``eval-ood --image-root``'s default). Every listed file must exist
    (checked at construction; the error names the line).

    Classes are the distinct labels >= 0 as strings (``"0"``, ``"1"``, ...), in numeric order.
    """

    def __init__(self, list_file: str | os.PathLike, root: str | os.PathLike | None = None, *, channels: int = 3,
                 on_bad_file: str = "error"):
        list_file = Path(list_file)
        root = list_file.parent if root is None else Path(root)
        if not list_file.is_file():
            raise InputError(f"image list {list_file} does not exist")
        if not root.is_dir():
            raise InputError(f"image root {root} does not exist; give the folder the list's paths are relative to")
        samples = []
        for n, line in enumerate(list_file.read_text().splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) == 2 and parts[1].lstrip("-").isdigit():
                rel, label = parts[0], int(parts[1])
            else:
                rel, label = line.strip(), -1
            path = root / rel
            if not path.is_file():
                raise InputError(f"{list_file} line {n}: {path} does not exist; fix the list or the root folder")
            samples.append((str(path), label))
        if not samples:
            raise InputError(f"image list {list_file} lists no images")
        classes = [str(c) for c in sorted({y for _, y in samples if y >= 0})]
        super().__init__(samples, classes, channels=channels, on_bad_file=on_bad_file, root=root)


def open_unlabelled(root: str | os.PathLike, *, channels: int = 3, on_bad_file: str = "error") -> ImageFiles:
    """An OOD set that needs no classes: every image under ``root`` at any depth (a flat folder of images,
    a texture-style ``images/<class>/`` root, class folders...), label -1, in sorted path order."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"OOD folder {root} does not exist")
    files = _images_under(root)
    if not files:
        raise InputError(f"OOD folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)}) at any depth")
    return ImageFiles([(str(p), -1) for p in files], [], channels=channels, on_bad_file=on_bad_file, root=root)


def open_corrupted(root: str | os.PathLike, corruption: str, severity: int, *, channels: int = 3,
                   on_bad_file: str = "error", classes: list[str] | None = None) -> ImageFiles:
    """One condition of ImageNet-C (``root/<corruption>/<severity>/<class>/<image>``), lazily."""
    from .memory import corrupted_layout, corrupted_names

    root = Path(root)
    if corrupted_layout(root) != "imagenet-c":
        raise InputError(f"{root} is not ImageNet-C shaped (corruption/severity/class/image)")
    if corruption not in corrupted_names(root):
        raise InputError(f"{root} has no corruption {corruption!r}; it holds {', '.join(corrupted_names(root))}")
    folder = root / corruption / str(severity)
    if not folder.is_dir():
        raise InputError(f"{folder} is missing: ImageNet-C layout is corruption/severity/class/image, severities 1..5")
    return open_folder(folder, channels=channels, on_bad_file=on_bad_file, classes=classes)


# ---------------------------------------------------------------------- matching classes to a classifier
def class_index_map(dataset_classes: list[str], classifier_classes: list[str]) -> torch.Tensor:
    """For each class of a dataset, the index of the same class in a classifier (matched by name, e.g. the
    WordNet id). Numeric dataset classes (ImageNet-V2) that are not names of the classifier are class indices.

    Raises:
        InputError: naming the first dataset classes the classifier does not know.
    """
    known = {c: i for i, c in enumerate(classifier_classes)}
    if all(c in known for c in dataset_classes):
        return torch.tensor([known[c] for c in dataset_classes], dtype=torch.long)
    if dataset_classes and all(c.isdigit() and int(c) < len(classifier_classes) for c in dataset_classes):
        return torch.tensor([int(c) for c in dataset_classes], dtype=torch.long)
    missing = [c for c in dataset_classes if c not in known]
    raise InputError(f"the classifier does not know {len(missing)} classes of this set: {', '.join(missing[:5])}"
                     f"{' ...' if len(missing) > 5 else ''}; classes are matched by folder name (WordNet id)")


def restrict_logits(logits: torch.Tensor, index_map: torch.Tensor) -> torch.Tensor:
    """Keep the logits of a subset's classes, in the subset's order (ImageNet-R/-A: 200 of 1000 classes, as
    their official evaluations do), so ``argmax`` is a label of the subset."""
    return logits.index_select(-1, index_map.to(logits.device))
