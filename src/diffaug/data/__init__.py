"""The data layer: every source is a ``torch.utils.data.Dataset`` of ``(image [C, H, W] in [0, 1], label)``.

* :mod:`~diffaug.data.memory`: the in-memory sources (the embedded digits, CIFAR-10, an equal-size image
  folder read whole, CIFAR-10-C / ImageNet-C conditions, the far-OOD sets of the embedded default): exactly
  what ``diffaug.data`` computed before it became a package, so the study's numbers do not move.
* :mod:`~diffaug.data.files`: lazy sources read from disk item by item (class folders of any image size and
  mode, ImageNet's ``train/`` + ``val/``, a single folder split without overlap, ImageNet-V2 numeric classes,
  ImageNet-R/-A subsets, OpenOOD image lists, OOD folders, ImageNet-C).
* :mod:`~diffaug.data.transforms`: torchvision v2 train / eval transforms, seeded per sample.
* :mod:`~diffaug.data.loader`: a DataLoader with workers over a resumable, rank-aware sampler, and
  :func:`~diffaug.data.loader.read_sample`: a bounded, seeded, class-stratified sample held in memory.
"""

from .files import (BAD_FILE_POLICIES, SPLIT_FRACTIONS, BadImageError, ImageFiles, ImageList, aligned_copy,
                    class_folders, class_index_map, decode_image, open_corrupted, open_folder, open_splits,
                    open_unlabelled, restrict_logits, split_indices, split_layout, stratified_sample, with_extra)
from .loader import (ResumableSampler, StepBatches, check_workers, default_workers, make_loader, make_step_loader,
                     read_sample)
from .memory import (CIFAR10_CLASSES, CORRUPTED_LAYOUTS, FAR_OOD_SETS, IMAGE_SUFFIXES, SPLITS, ImageDataset,
                     corrupted_layout, corrupted_names, digits_split_indices, is_in_memory, load_cifar10,
                     load_corrupted, load_dataset, load_digits, load_image_folder, noise_images, photo_patches,
                     subset_classes)
from .transforms import (TRANSFORM_LIBRARIES, SeededView, check_library, check_size, eval_transform,
                         generative_transform, sample_seed, train_transform)

__all__ = [
    "BAD_FILE_POLICIES", "BadImageError", "CIFAR10_CLASSES", "CORRUPTED_LAYOUTS", "FAR_OOD_SETS",
    "IMAGE_SUFFIXES", "ImageDataset", "ImageFiles", "ImageList", "ResumableSampler", "SPLITS", "SPLIT_FRACTIONS",
    "SeededView", "StepBatches", "TRANSFORM_LIBRARIES", "aligned_copy", "check_library", "check_size",
    "check_workers", "class_folders", "class_index_map", "corrupted_layout", "corrupted_names", "decode_image",
    "default_workers", "digits_split_indices", "eval_transform", "generative_transform", "is_in_memory",
    "load_cifar10", "load_corrupted", "load_dataset", "load_digits", "load_image_folder", "make_loader",
    "make_step_loader", "noise_images", "open_corrupted", "open_folder", "open_splits", "open_unlabelled",
    "photo_patches", "read_sample", "restrict_logits", "sample_seed", "split_indices", "split_layout", "stratified_sample",
    "subset_classes", "train_transform", "with_extra",
]
