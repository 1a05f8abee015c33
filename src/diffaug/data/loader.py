"""Loaders: a DataLoader with workers, pinned memory and persistent workers, over a resumable sampler.

:class:`ResumableSampler` orders each epoch exactly as ``torch.utils.data.DistributedSampler`` does (a function
of ``(seed, epoch, rank, world_size)``; one process is rank 0 of 1) and can start mid-epoch: it yields the
sample keys ``(epoch, index)`` from a given position, so a resumed run never reads the items it skips. Together
with :class:`diffaug.data.transforms.SeededView` every batch is a function of ``(seed, epoch, rank, position)``,
whatever the number of workers.
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, DistributedSampler, default_collate

from ..errors import InputError


def default_workers() -> int:
    """min(8, the CPUs this process may use)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return min(8, cpus)


def check_workers(workers: int | None) -> int:
    """``workers`` (None: :func:`default_workers`) as an int >= 0, else a one-line error."""
    if workers is None:
        return default_workers()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise InputError(f"workers must be a whole number >= 0 (0 loads in the main process), got {workers!r}")
    return workers


def collate_images(batch):
    """``default_collate``, except that images of different sizes in one batch (a folder read without a transform
    that sizes them) are a one-line :class:`~diffaug.InputError` naming the fix, not PyTorch's stack error."""
    try:
        return default_collate(batch)
    except RuntimeError as e:
        if "stack expects each tensor to be equal size" not in str(e):
            raise
        raise InputError(f"the images of one batch differ in size ({str(e).split(', but got ', 1)[-1]}); read the "
                         "dataset through a transform that gives one size (diffaug.data.eval_transform(size) or "
                         "train_transform(size)) or use batch size 1") from None


class Loader(DataLoader):
    """A ``DataLoader`` whose workers' :class:`~diffaug.InputError` (e.g. an unreadable image) reaches the caller
    as the same one-line error, not wrapped in the worker's traceback; batches are collated by
    :func:`collate_images` unless a ``collate_fn`` is given."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("collate_fn", collate_images)
        super().__init__(*args, **kwargs)

    def __iter__(self):
        it = super().__iter__()

        def batches():
            try:
                yield from it
            except InputError as e:
                text = str(e)
                if "Original Traceback" not in text:
                    raise
                last = text.strip().splitlines()[-1]  # "package.module.ErrorName: the message"
                raise type(e)(last.split(": ", 1)[1] if ": " in last else last) from None

        return batches()


class ResumableSampler(DistributedSampler):
    """``DistributedSampler``'s order (shuffled per epoch with ``seed + epoch``, padded or truncated to a
    multiple of ``world_size``, every ``world_size``-th item for ``rank``), yielding ``(epoch, index)`` keys
    from position :attr:`start` of this rank's epoch.

    Args:
        n: the dataset's length.
        seed, rank, world_size, shuffle, drop_last: as ``DistributedSampler``'s.
    """

    def __init__(self, n: int, *, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 drop_last: bool = False):
        super().__init__(range(n), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        """The next iteration yields epoch ``epoch`` from this rank's ``start``-th sample on."""
        if not 0 <= start <= self.num_samples:
            raise InputError(f"start position {start} is outside this rank's epoch of {self.num_samples} samples")
        self.set_epoch(epoch)
        self.start = start

    def indices(self) -> list[int]:
        """This rank's whole epoch, as ``DistributedSampler`` orders it."""
        return list(super().__iter__())

    def __iter__(self):
        epoch = self.epoch
        return iter([(epoch, i) for i in self.indices()[self.start:]])

    def __len__(self) -> int:
        return self.num_samples - self.start


class StepBatches(torch.utils.data.Sampler):
    """A batch sampler for step-indexed training loops: batch ``step`` is ``[(step, i) for i in
    batch_indices(step)]`` for ``step`` in ``start .. stop - 1``, so each sample's random transform is a function
    of ``(seed, step, index)`` and a resumed run starts at its step without reading the batches before it.

    Args:
        batch_indices: ``step -> indices`` of that step's batch (a pure function of the step).
        start, stop: the steps to yield.
    """

    def __init__(self, batch_indices, start: int, stop: int):
        self.batch_indices, self.start, self.stop = batch_indices, int(start), int(stop)

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield [(step, int(i)) for i in self.batch_indices(step)]

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def make_step_loader(dataset, batch_indices, start: int, stop: int, *, workers: int | None = None,
                     pin_memory: bool | None = None) -> "Loader":
    """A DataLoader over :class:`StepBatches` (``dataset``: usually a
    :class:`~diffaug.data.transforms.SeededView`); arguments as :class:`StepBatches` and :func:`make_loader`."""
    workers = check_workers(workers)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return Loader(dataset, batch_sampler=StepBatches(batch_indices, start, stop), num_workers=workers,
                  pin_memory=pin_memory, persistent_workers=False)


def make_loader(dataset, batch_size: int, *, sampler=None, workers: int | None = None,
                pin_memory: bool | None = None, drop_last: bool = False, prefetch_factor: int | None = None
                ) -> Loader:
    """A DataLoader for ``dataset`` (usually a :class:`~diffaug.data.transforms.SeededView`).

    Args:
        dataset: the dataset.
        batch_size: samples per batch (per rank).
        sampler: e.g. a :class:`ResumableSampler`; None reads ``dataset`` in order.
        workers: worker processes (None: :func:`default_workers`; 0 loads in this process).
        pin_memory: pin batches for fast host-to-GPU copies (None: when CUDA is available).
        drop_last: drop a last incomplete batch.
        prefetch_factor: batches each worker loads ahead (None: DataLoader's default).
    """
    workers = check_workers(workers)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch size must be a whole number >= 1, got {batch_size!r}")
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    extra = {"prefetch_factor": prefetch_factor} if workers and prefetch_factor else {}
    return Loader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, persistent_workers=workers > 0, drop_last=drop_last, **extra)


def read_sample(source, transform, n: int | None = None, *, indices=None, seed: int = 0, batch_size: int = 64,
                workers: int | None = None):
    """A bounded part of a (lazy) source read through ``transform`` into memory, for what needs real images held
    together (a reference set for generation metrics, a judge's training set, the images of a figure).

    Args:
        source: a dataset with ``labels`` (e.g. :class:`~diffaug.data.files.ImageFiles`).
        transform: a deterministic transform (e.g. :func:`~diffaug.data.transforms.eval_transform`); each
            item is read through :class:`~diffaug.data.transforms.SeededView` with ``seed``.
        n: at most this many items, a seeded class-stratified sample
            (:func:`~diffaug.data.files.stratified_sample` with ``seed``), in index order.
        indices: instead of ``n``, exactly these items, in this order.
        seed, batch_size, workers: the sample's seed, the loader's batch and worker processes.

    Returns:
        An :class:`~diffaug.data.memory.ImageDataset` (images ``[m, C, size, size]`` in [0, 1], labels, the
        source's classes); only ``m`` images are ever held.
    """
    from torch.utils.data import Subset

    from .files import stratified_sample
    from .memory import ImageDataset
    from .transforms import SeededView

    if (n is None) == (indices is None):
        raise InputError("give exactly one of n (a stratified sample) or indices")
    if indices is None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"sample size must be a whole number >= 1, got {n!r}")
        indices = stratified_sample(source.labels.numpy(), n, seed)
    indices = [int(i) for i in indices]
    if not indices:
        raise InputError("the sample holds no images")
    view = Subset(SeededView(source, transform, seed=seed), indices)
    images, labels = [], []
    for x, y in make_loader(view, batch_size, workers=workers, pin_memory=False):
        images.append(x)
        labels.append(y)
    return ImageDataset(torch.cat(images), torch.cat(labels).long(), list(source.classes))
