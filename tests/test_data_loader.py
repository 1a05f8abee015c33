"""Transforms, per-sample seeding, the resumable sampler and the loader of diffaug.data."""

from __future__ import annotations

import pytest
import torch
from imagenet_tree import make_tree
from torch.utils.data import DistributedSampler

from diffaug import InputError
from diffaug.data import (ResumableSampler, SeededView, eval_transform, load_digits, make_loader, open_folder,
                          open_splits, sample_seed, train_transform)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("imagenet"))


def _batches(loader):
    return [tuple(t.clone() for t in batch) for batch in loader]


def test_eval_transform_is_resize_then_center_crop(tree):
    from torchvision.transforms.v2 import functional as TF

    ds = open_splits(tree)["val"]
    view = SeededView(ds, eval_transform(32))
    for i in (0, 4):
        raw, _ = ds.read(i)
        ref = TF.center_crop(TF.resize(raw, 37, antialias=True), 32).float() / 255  # round(32 / 0.875) = 37
        x, y = view[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == ds.samples[i][1]
        assert torch.allclose(x, ref)


def test_random_crops_are_a_function_of_seed_epoch_index_only(tree):
    ds = open_splits(tree)["train"]
    view = SeededView(ds, train_transform(24), seed=3)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = view[(1, 5)][0]
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is untouched
    assert torch.equal(a, view[(1, 5)][0]) and a.shape == (3, 24, 24)
    assert torch.equal(view[5][0], view[(0, 5)][0])
    others = [view[(e, 5)][0] for e in range(2, 6)] + [SeededView(ds, train_transform(24), seed=4)[(1, 5)][0]]
    assert not any(torch.equal(a, o) for o in others)
    assert len({sample_seed(0, e, i) for e in range(20) for i in range(50)}) == 1000
    # two views of one decoded image: the random crop and the evaluation view
    crop, center, y = SeededView(ds, train_transform(24), eval_transform(24))[(0, 2)]
    assert torch.equal(center, SeededView(ds, eval_transform(24))[2][0])


def test_sampler_orders_as_distributed_sampler_and_resumes_mid_epoch():
    for rank, world in ((0, 1), (1, 3)):
        s = ResumableSampler(23, seed=7, rank=rank, world_size=world)
        ref = DistributedSampler(range(23), num_replicas=world, rank=rank, shuffle=True, seed=7)
        for epoch in (0, 4):
            s.set_position(epoch)
            ref.set_epoch(epoch)
            assert [i for _, i in s] == list(ref) and {e for e, _ in s} == {epoch}
            s.set_position(epoch, 3)
            assert [i for _, i in s] == list(ref)[3:] and len(s) == len(ref) - 3
    with pytest.raises(InputError, match="start position 99"):
        s.set_position(0, 99)


def test_batches_do_not_depend_on_the_number_of_workers(tree):
    ds = open_splits(tree)["train"]
    runs = []
    for workers in (0, 2):
        sampler = ResumableSampler(len(ds), seed=1)
        loader = make_loader(SeededView(ds, train_transform(16), seed=1), 5, sampler=sampler, workers=workers)
        epochs = []
        for epoch in (0, 1):
            sampler.set_position(epoch)
            epochs.append(_batches(loader))
        runs.append(epochs)
    assert len(runs[0][0]) == 6  # 28 images, batches of 5 and a last one of 3
    for e in (0, 1):
        for b0, b2 in zip(runs[0][e], runs[1][e]):
            assert all(torch.equal(u, v) for u, v in zip(b0, b2))
    assert not torch.equal(runs[0][0][0][0], runs[0][1][0][0])  # a new epoch, a new order and new crops


class _CountingReads(torch.utils.data.Dataset):
    def __init__(self, source):
        self.source, self.reads = source, []

    def __len__(self):
        return len(self.source)

    def read(self, index):
        self.reads.append(index)
        return self.source.read(index)


def test_resuming_mid_epoch_equals_the_uninterrupted_order_without_decoding_skipped_items(tree):
    ds = _CountingReads(open_splits(tree)["train"])
    view = SeededView(ds, train_transform(16), seed=2)
    sampler = ResumableSampler(len(ds), seed=2)
    loader = make_loader(view, 4, sampler=sampler, workers=0, drop_last=True)
    sampler.set_position(1)
    whole = _batches(loader)
    ds.reads.clear()
    sampler.set_position(1, 3 * 4)  # resume after three batches of epoch 1
    resumed = _batches(loader)
    assert len(resumed) == len(whole) - 3
    for b, r in zip(whole[3:], resumed):
        assert all(torch.equal(u, v) for u, v in zip(b, r))
    assert sorted(ds.reads) == sorted(sampler.indices()[12:])  # the skipped images were never read


def test_bad_files_are_skipped_the_same_way_with_workers(tree, tmp_path):
    root = make_tree(tmp_path / "t", {"train": 4}, odd_files=False) / "train"
    bad = sorted(root.rglob("*.JPEG"))[5]
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    ds = open_folder(root, on_bad_file="skip")
    out = []
    for workers in (0, 2):
        sampler = ResumableSampler(len(ds), seed=0)
        out.append(_batches(make_loader(SeededView(ds, train_transform(12)), 4, sampler=sampler, workers=workers)))
    assert all(torch.equal(u, v) for b0, b2 in zip(*out) for u, v in zip(b0, b2))
    assert ds.bad_files_skipped == 2  # once per pass, counted across the workers
    strict = open_folder(root)
    for workers in (0, 2):  # from a worker process too: the same one-line error
        with pytest.raises(InputError, match=f"^cannot read image {bad}") as e:
            _batches(make_loader(SeededView(strict, train_transform(12)), 4, workers=workers))
        assert "\n" not in str(e.value)


def test_in_memory_sources_share_the_interface_and_loader():
    digits = load_digits("val")
    sampler = ResumableSampler(len(digits), seed=0)
    batch = next(iter(make_loader(SeededView(digits, lambda x: x), 8, sampler=sampler, workers=0)))
    order = sampler.indices()[:8]
    assert torch.equal(batch[0], digits.images[order]) and torch.equal(batch[1], digits.labels[order])


def test_loader_and_transform_settings_are_checked(tree):
    ds = open_splits(tree)["val"]
    with pytest.raises(InputError, match="workers must be a whole number >= 0"):
        make_loader(ds, 4, workers=-1)
    with pytest.raises(InputError, match="image size must be a whole number >= 1, got 0"):
        train_transform(0)
    with pytest.raises(InputError, match="image size must be a whole number >= 1"):
        eval_transform(-3)
    with pytest.raises(InputError, match="batch size"):
        make_loader(ds, 0, workers=0)
    loader = make_loader(ds, 4)
    assert loader.num_workers == min(8, len(__import__("os").sched_getaffinity(0)))
    assert loader.persistent_workers == (loader.num_workers > 0)


@pytest.mark.parametrize("workers", [0, 1])
def test_images_of_different_sizes_in_one_batch_are_one_line(tmp_path, workers):
    # A folder read without a transform that sizes its images: PyTorch's "stack expects each tensor to be equal
    # size" (from a worker, inside its traceback) becomes a one-line InputError naming the fix.
    import numpy as np
    from PIL import Image

    from diffaug.data.files import ImageFiles

    for i, size in enumerate([(20, 20), (24, 30)]):
        Image.fromarray(np.full((*size, 3), 100, np.uint8)).save(tmp_path / f"{i}.png")
    files = ImageFiles([(str(tmp_path / f"{i}.png"), 0) for i in range(2)], ["a"])
    with pytest.raises(InputError, match=r"^the images of one batch differ in size \(\[3, 20, 20\] at entry 0 and "
                                         r"\[3, 24, 30\] at entry 1\); read the dataset through a transform") as e:
        list(make_loader(files, 2, workers=workers))
    assert len(str(e.value).splitlines()) == 1
    assert [b[0].shape for b in make_loader(files, 1, workers=workers)] == [(1, 3, 20, 20), (1, 3, 24, 30)]
