"""The lazy on-disk sources of diffaug.data: layouts, modes, splits, class matching and their errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import write_imagenet_c
from imagenet_tree import WNIDS, make_tree
from PIL import Image

from diffaug import InputError
from diffaug.data import (ImageList, class_index_map, digits_split_indices, load_corrupted, load_digits,
                          open_corrupted, open_folder, open_splits, open_unlabelled, restrict_logits, split_indices)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("imagenet"))


def test_imagenet_style_tree_reads_every_mode_lazily(tree):
    sets = open_splits(tree)
    assert sets["train"].classes == list(WNIDS) and sets["val"].classes == list(WNIDS)
    assert sets["test"] is sets["val"]  # ImageNet: no test folder, val is the test split
    assert len(sets["train"]) == 3 * 8 + 4 and len(sets["val"]) == 9
    shapes = set()
    for i in range(len(sets["train"])):
        x, y = sets["train"][i]
        assert x.dtype == torch.float32 and x.shape[0] == 3 and 0 <= x.min() and x.max() <= 1
        assert sets["train"].classes[y] == sets["train"].samples[i][0].split("/")[-2]
        shapes.add(tuple(x.shape))
    assert len(shapes) > 5  # images of varying sizes, no resize needed to read them
    by_name = {p.rsplit("/", 1)[-1]: i for i, (p, _) in enumerate(sets["train"].samples)}
    # the odd modes decode to RGB with the colour they were written with (class 0 red, 1 green, 2 blue)
    for name, channel in (("cmyk.jpg", 0), ("palette.png", 1), ("alpha.png", 2)):
        x, _ = sets["train"][by_name[name]]
        means = x.mean((1, 2))
        assert means.argmax() == channel, (name, means)
    gray, _ = sets["train"][by_name["gray.jpg"]]
    assert torch.allclose(gray[0], gray[1]) and torch.allclose(gray[1], gray[2])
    # one channel on request, for every mode
    one = open_splits(tree, channels=1)["train"]
    for name in by_name:
        assert one[by_name[name]][0].shape[0] == 1
    rgb = np.asarray(Image.open(one.samples[by_name["alpha.png"]][0]).convert("L"), np.float32) / 255
    assert np.allclose(one[by_name["alpha.png"]][0][0].numpy(), rgb)


def test_single_folder_is_split_without_overlap_and_deterministically(tree, capsys):
    sets = open_splits(tree / "train", verbose=True)
    assert "train 19, val 3, test 6 images, 3 classes" in capsys.readouterr().out
    paths = {s: {p for p, _ in d.samples} for s, d in sets.items()}
    assert not (paths["train"] & paths["val"] or paths["train"] & paths["test"] or paths["val"] & paths["test"])
    assert len(paths["train"] | paths["val"] | paths["test"]) == 3 * 8 + 4
    again = open_splits(tree / "train")
    assert all(sets[s].samples == again[s].samples for s in sets)
    for s in sets:  # stratified: every class in every split
        assert set(sets[s].labels.tolist()) == {0, 1, 2}
    # the pure split: sizes per class follow the fractions, a different seed gives another split
    labels = np.repeat(np.arange(4), 50)
    idx = split_indices(labels)
    assert [len(idx[s]) for s in ("train", "val", "test")] == [140, 20, 40]
    assert not np.array_equal(split_indices(labels, seed=1)["test"], idx["test"])
    assert split_indices([0])["train"].tolist() == [0]  # a class of one image stays in train


def test_numeric_class_folders_are_class_indices(tmp_path):
    """ImageNet-V2: folders 0..999 are class indices in numeric order, not sorted strings."""
    for c in ("0", "1", "2", "10"):
        (tmp_path / c).mkdir()
        Image.fromarray(np.full((9, 7, 3), int(c) * 20, np.uint8)).save(tmp_path / c / "a.png")
    ds = open_folder(tmp_path)
    assert ds.classes == ["0", "1", "2", "10"]
    assert class_index_map(ds.classes, [f"n{i:08d}" for i in range(12)]).tolist() == [0, 1, 2, 10]
    x, y = ds[3]
    assert ds.classes[y] == "10" and torch.allclose(x, torch.full_like(x, 200 / 255))


def test_subset_classes_by_wordnet_id_restrict_a_classifiers_logits():
    """ImageNet-R/-A: 200 of 1000 classes; the classifier's logits are restricted to the subset's classes."""
    classifier_classes = [f"n{i:08d}" for i in range(10)]
    subset = ["n00000007", "n00000002", "n00000005"]
    index = class_index_map(subset, classifier_classes)
    assert index.tolist() == [7, 2, 5]
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    logits[torch.arange(6), torch.tensor([7, 2, 5, 7, 2, 5])] += 10  # the true subset class wins
    logits[:, 0] += 100  # a class outside the subset wins overall and must be ignored
    assert restrict_logits(logits, index).argmax(1).tolist() == [0, 1, 2, 0, 1, 2]
    with pytest.raises(InputError, match="does not know 2 classes of this set: n00000099, n00000098"):
        class_index_map(["n00000001", "n00000099", "n00000098"], classifier_classes)


def test_image_list_and_unlabelled_ood_folders(tree, tmp_path):
    train = tree / "train"
    lines = [f"train/{WNIDS[1]}/{WNIDS[1]}_0001.JPEG 1", "", f"train/{WNIDS[0]}/gray.jpg 0",
             f"train/{WNIDS[2]}/alpha.png"]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    ds = ImageList(tmp_path / "list.txt", tree)
    assert len(ds) == 3 and ds.labels.tolist() == [1, 0, -1] and ds.classes == ["0", "1"]
    assert torch.equal(ds[0][0], open_folder(train)[open_folder(train).samples.index(
        (str(train / WNIDS[1] / f"{WNIDS[1]}_0001.JPEG"), 1))][0])
    (tmp_path / "bad.txt").write_text(lines[0] + "\nnot/there.jpg 3\n")
    with pytest.raises(InputError, match=r"bad.txt line 2: .*not/there.jpg does not exist"):
        ImageList(tmp_path / "bad.txt", tree)
    # a flat folder of images, and a texture-style images/<class>/ root: no classes needed
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.fromarray(np.full((10 + i, 12, 3), 50 * i, np.uint8)).save(flat / f"{i}.png")
    assert len(open_unlabelled(flat)) == 3 and open_unlabelled(flat)[2][1] == -1
    assert len(open_unlabelled(tree / "val")) == 9  # any depth (e.g. DTD's images/<texture>/)
    with pytest.raises(InputError, match="no class sub-folders .*loose images"):
        open_folder(flat)


def test_imagenet_c_condition_lazily_equals_the_in_memory_reader(tmp_path):
    write_imagenet_c(tmp_path, severities=(1, 2), classes=("cat", "dog"), per_class=3, rgb=True, class_step=1)
    lazy = open_corrupted(tmp_path, "fog", 2)
    ref = load_corrupted(tmp_path, "fog", 2)
    assert lazy.classes == ref.classes
    assert torch.equal(torch.stack([lazy[i][0] for i in range(len(lazy))]), ref.images)
    assert lazy.labels.tolist() == ref.labels.tolist()
    with pytest.raises(InputError, match="no corruption 'snow'"):
        open_corrupted(tmp_path, "snow", 1)


def test_bad_input_is_one_line_before_any_work(tree, tmp_path):
    def one_line(match, fn, *args, **kw):
        with pytest.raises(InputError, match=match) as e:
            fn(*args, **kw)
        assert "\n" not in str(e.value)

    (tmp_path / "empty" / "cat").mkdir(parents=True)
    one_line("holds no images", open_splits, tmp_path / "empty")
    one_line("does not exist", open_splits, tmp_path / "nowhere")
    (tmp_path / "a_file.txt").write_text("not a folder")
    one_line("data folder .*a_file.txt is a file, not a folder", open_splits, tmp_path / "a_file.txt")
    # train and val with different class sets
    other = make_tree(tmp_path / "mismatch", {"train": 1, "val": 1}, odd_files=False)
    for d in (other / "val" / WNIDS[2]).iterdir():
        d.unlink()
    (other / "val" / WNIDS[2]).rmdir()
    one_line(f"different class sets \\(val lacks {WNIDS[2]}\\)", open_splits, other)
    # an incomplete split layout is not a dataset of classes "train" (or "val" and "test")
    only_train = make_tree(tmp_path / "only_train", {"train": 1, "val": 1}, odd_files=False)
    shutil.rmtree(only_train / "val")
    one_line(r"holds train/ but not a split layout .* give .*only_train/train as one folder", open_splits, only_train)
    no_train = make_tree(tmp_path / "no_train", {"train": 1, "val": 1}, odd_files=False)
    shutil.copytree(no_train / "val", no_train / "test")
    shutil.rmtree(no_train / "train")
    one_line(r"holds test/, val/ but not a split layout", open_splits, no_train)
    one_line(r"too few to split .*\(no val images\)", open_splits, only_train / "train")  # one image per class
    one_line(r"split fractions \(0.8, 0.0, 0.2\) leave no val images", open_splits, tree / "train",
             fractions=(0.8, 0.0, 0.2))
    one_line("holds split folders .* open_splits", open_folder, tree)
    one_line("channels must be 1 or 3", open_folder, tree / "train", channels=2)
    one_line("on_bad_file must be one of error, skip", open_folder, tree / "train", on_bad_file="ignore")


def test_truncated_and_non_image_files_error_or_are_skipped_deterministically(tree, tmp_path):
    root = make_tree(tmp_path / "t", {"train": 3}, odd_files=False) / "train"
    good = open_folder(root)
    victim = root / WNIDS[1] / f"{WNIDS[1]}_0001.JPEG"
    victim.write_bytes(victim.read_bytes()[:200])  # truncated JPEG
    (root / WNIDS[2] / f"{WNIDS[2]}_0000.JPEG").write_bytes(b"this is not an image")
    ds = open_folder(root)
    i = [p for p, _ in ds.samples].index(str(victim))
    with pytest.raises(InputError, match=f"cannot read image {victim}"):
        ds[i]
    skip = open_folder(root, on_bad_file="skip")
    assert torch.equal(skip[i][0], good[i + 1][0]) and skip.bad_files_skipped == 1
    j = [p for p, _ in ds.samples].index(str(root / WNIDS[2] / f"{WNIDS[2]}_0000.JPEG"))
    assert torch.equal(skip[j][0], good[j + 1][0]) and skip.bad_files_skipped == 2


def test_the_in_memory_digits_are_unchanged():
    """The embedded default computes what it did before the package: an independent recomputation."""
    from sklearn.datasets import load_digits as sk
    from sklearn.model_selection import train_test_split

    bunch = sk()
    idx = np.arange(len(bunch.target))
    train, rest = train_test_split(idx, test_size=0.3, stratify=bunch.target, random_state=0)
    val, test = train_test_split(rest, test_size=2 / 3, stratify=bunch.target[rest], random_state=0)
    for split, ref in (("train", train), ("val", val), ("test", test)):
        ref = np.sort(ref)
        assert np.array_equal(digits_split_indices()[split], ref)
        ds = load_digits(split)
        assert torch.equal(ds.images, torch.from_numpy(bunch.images[ref].astype(np.float32) / 16)[:, None])
        assert ds.labels.tolist() == bunch.target[ref].tolist()
        x, y = ds[5]  # the Dataset interface
        assert torch.equal(x, ds.images[5]) and y == int(ds.labels[5])
    assert [len(load_digits(s)) for s in ("train", "val", "test")] == [1257, 180, 360]


def test_an_empty_class_folder_is_refused_as_torchvision_does(tmp_path):
    root = make_tree(tmp_path / "t", per_class={"x": 1}, odd_files=False) / "x"
    (root / "n09999999").mkdir()
    with pytest.raises(InputError, match=r"n09999999 holds no images \(1 empty in all"):
        open_folder(root)


def test_imagenets_flat_val_folder_is_named_with_the_way_to_sort_it(tmp_path):
    root = make_tree(tmp_path / "t", per_class={"train": 1}, odd_files=False)
    (root / "val").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "val" / "ILSVRC2012_val_00000001.JPEG", "JPEG")
    with pytest.raises(InputError, match=r"ImageNet.s flat validation folder .*torchvision\.datasets\.ImageNet\(root"):
        open_splits(root)


def test_symlinked_ood_folders_are_followed(tmp_path):
    real = tmp_path / "real" / "banded"
    real.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(real / "0.png")
    (tmp_path / "ood").mkdir()
    (tmp_path / "ood" / "banded").symlink_to(real, target_is_directory=True)
    assert len(open_unlabelled(tmp_path / "ood")) == 1
    (real / "loop").symlink_to(tmp_path / "real", target_is_directory=True)  # a link back up: read once
    assert len(open_unlabelled(tmp_path / "ood")) == 1


def test_a_split_may_lack_a_class_s_images_where_train_has_them(tmp_path):
    root = make_tree(tmp_path / "t", per_class={"train": 2, "val": 1}, odd_files=False)
    for f in (root / "val" / WNIDS[0]).iterdir():
        f.unlink()
    sets = open_splits(root)
    assert sets["val"].classes == sets["train"].classes and len(sets["val"]) == len(WNIDS) - 1


@pytest.mark.parametrize("severity", [0, 6, -1, "2", 2.0, True])
def test_load_corrupted_refuses_a_severity_outside_1_to_5(tmp_path, severity):
    root = write_imagenet_c(tmp_path / "inc")
    with pytest.raises(InputError, match="severity must be a whole number in 1..5"):
        load_corrupted(root, "fog", severity)


def test_an_image_list_is_relative_to_its_own_folder_by_default(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "test_x.txt").write_text("imgs/a.png 3\n")
    listed = ImageList(tmp_path / "test_x.txt")
    assert listed.samples == [(str(tmp_path / "imgs" / "a.png"), 3)]
