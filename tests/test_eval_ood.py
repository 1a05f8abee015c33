import csv

import numpy as np
import pytest
import torch
from PIL import Image

from diffaug import InputError
from diffaug.cli import main
from diffaug.data import load_digits, noise_images, photo_patches, subset_classes
from diffaug.train.classifier import TrainConfig, train_classifier


@pytest.fixture(scope="module")
def subset_clf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ood") / "plain"
    train_classifier(TrainConfig(recipe="plain", steps=30, classes=[0, 1, 2, 3, 4, 5], lr=3e-3), folder,
                     progress=False)
    return folder


def test_ood_sets_are_fixed_and_in_range():
    p = photo_patches()
    assert p.shape == (120, 1, 8, 8) and p.min() >= 0 and p.max() <= 1
    assert torch.equal(photo_patches(), p)
    n = noise_images(seed=3)
    assert n.shape == (200, 1, 8, 8) and torch.equal(n, noise_images(seed=3))
    sub = subset_classes(load_digits("test"), [7, 2])
    assert set(sub.labels.tolist()) == {0, 1} and sub.classes == ["7", "2"]
    with pytest.raises(InputError, match="do not exist"):
        subset_classes(load_digits("test"), [3, 12])


def test_eval_ood_cli_writes_table_and_csv(tmp_path, subset_clf):
    folder = tmp_path / "ood_folder" / "x"
    folder.mkdir(parents=True)
    for i in range(5):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / f"{i}.png")
    import shutil

    twin = tmp_path / "plain-twin"
    shutil.copytree(subset_clf, twin)
    assert main(["eval-ood", "--classifier", str(subset_clf), str(twin), "--out", str(tmp_path / "o"),
                 "--ood", "holdout", "noise", f"near={tmp_path / 'ood_folder'}"]) == 0
    table = (tmp_path / "o" / "table.md").read_text()
    assert "## near-OOD (holdout, ood_folder): AUROC" in table and "| plain (2) |" in table
    rows = list(csv.DictReader(open(tmp_path / "o" / "results.csv")))
    assert len(rows) == 2 * 7 * 3  # classifiers x scores x sets
    assert {r["classifier"] for r in rows} == {subset_clf.name, "plain-twin"}  # short keys, as eval-shift's
    msp = [r for r in rows if r["score"] == "msp" and r["set"] == "holdout"][0]
    assert float(msp["auroc"]) > 0.8  # a trained classifier separates held-out digits better than chance


def test_percentile_search_uses_validation_sets_only(tmp_path, subset_clf):
    from diffaug.classifier import load_classifier
    from diffaug.ood import search_percentile

    model = load_classifier(subset_clf)
    val = subset_classes(load_digits("val"), [0, 1, 2, 3, 4, 5]).images
    p = search_percentile(model, "react", val, noise_images(50, seed=9), grid=(60, 90))
    assert p in (60.0, 90.0)
    assert np.isnan(search_percentile(model, "msp", val, noise_images(50)))  # MSP has no percentile
    assert main(["eval-ood", "--classifier", str(subset_clf), "--ood", "noise", "--search-percentile",
                 "--out", str(tmp_path / "s")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "s" / "results.csv")))
    assert {r["score"]: r["percentile"] for r in rows}["msp"] == ""


def test_eval_ood_errors(tmp_path, subset_clf, capsys):
    cases = [
        (["--ood", "imagenet-o"], "unknown OOD set 'imagenet-o'"),
        (["--ood", str(tmp_path / "missing")], "OOD folder " + str(tmp_path / "missing") + " does not exist"),
    ]
    for extra, match in cases:
        assert main(["eval-ood", "--classifier", str(subset_clf), "--out", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0]
    assert not (tmp_path / "o").exists()


def test_an_ood_set_identical_to_the_in_memory_id_set_is_not_told_apart(tmp_path, subset_clf):
    """OOD folders next to digits / CIFAR-10 get the ID images' pre-processing (whole, at their own size; not the
    Resize(size / 0.875) + CenterCrop zoom of streamed sets): the ID test images themselves, written as PNGs into a
    texture-style images/<class>/ root, a flat folder and an image list, score as the ID set (AUROC 0.5 up to the 8-bit
    rounding of the files)."""
    test = subset_classes(load_digits("test"), [0, 1, 2, 3, 4, 5]).images
    for i, image in enumerate(test):
        pixels = (image[0] * 255).round().to(torch.uint8).numpy()
        (tmp_path / "textures" / "images" / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(tmp_path / "textures" / "images" / f"c{i % 3}" / f"{i:04d}.png")
        (tmp_path / "flat").mkdir(exist_ok=True)
        Image.fromarray(pixels).save(tmp_path / "flat" / f"{i:04d}.png")
    (tmp_path / "list.txt").write_text("".join(f"flat/{i:04d}.png\n" for i in range(len(test))))  # OpenOOD's
    assert main(["eval-ood", "--classifier", str(subset_clf), "--out", str(tmp_path / "o"),
                 "--ood", str(tmp_path / "textures"), str(tmp_path / "flat"), str(tmp_path / "list.txt")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "o" / "results.csv")))
    assert {r["set"] for r in rows} == {"textures", "flat", "list"} and len(rows) == 3 * 7
    for r in rows:
        assert abs(float(r["auroc"]) - 0.5) < 0.03, r
