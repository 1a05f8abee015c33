"""The evaluations on image folders: a classifier trained by `diffaug train` on the synthetic ImageNet-style tree,
then eval-shift (ImageNet-C and a folder corrupted on the fly), eval-ood (folders, image lists) and certify on
the same tree, at the classifier's own input size, with classes matched by name."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from diffaug.classifier import create_classifier, input_size, load_classifier, save_classifier
from diffaug.cli import main
from diffaug.data import stratified_sample
from conftest import write_rgb_denoiser
from imagenet_tree import WNIDS, make_tree

SIZE = 16


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed")
    tree = make_tree(root / "tree")
    inc = make_tree(root / "inc" / "fog", per_class={"5": 1}, odd_files=False, seed=1).parent  # fog/5/<wnid>/
    clf = root / "clf"
    assert main(["train", "--data", str(tree), "--recipe", "plain", "--model", "small_cnn", "--image-size", str(SIZE),
                 "--steps", "6", "--batch-size", "8", "--workers", "0", "--out", str(clf), "--quiet",
                 "--device", "cpu"]) == 0
    return {"root": root, "tree": tree, "inc": inc, "clf": clf, "den": write_rgb_denoiser(root / "den", SIZE)}


def test_streamed_evaluations_end_to_end(world, tmp_path):
    spec = json.loads((world["clf"] / "model.json").read_text())
    assert spec["image_size"] == SIZE and spec["classes"] == list(WNIDS) and spec["mean"] == [0.5] * 3
    assert spec["test_acc"] > 1 / 3  # the colours are learnt: above chance

    out = tmp_path / "inc"  # ImageNet-C of 24..72-px JPEGs, scored at 16 px, DE through a 16-px denoiser
    assert main(["eval-shift", "--data", str(world["inc"]), "--classifier", str(world["clf"]), "--denoiser",
                 str(world["den"]), "--modes", "default,de", "--severities", "5", "--batch", "2", "--workers", "0",
                 "--no-analyses", "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    rows = _rows(out / "results.csv")
    assert [(r["mode"], r["corruption"], r["n"]) for r in rows] == [("default", "fog", "3"), ("de", "fog", "3")]

    out = tmp_path / "folder"  # split folders: val is the test split, corrupted batch by batch
    assert main(["eval-shift", "--data", str(world["tree"]), "--classifier", str(world["clf"]), "--modes", "default",
                 "--corruptions", "fog,gaussian_noise", "--severities", "5", "--no-analyses", "--batch", "4",
                 "--workers", "1", "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    rows = _rows(out / "results.csv")
    assert [(r["corruption"], r["n"]) for r in rows] == [("clean", "9"), ("fog", "9"), ("gaussian_noise", "9")]
    assert float(rows[0]["accuracy"]) > 1 / 3

    flat, lists = tmp_path / "flat", tmp_path / "lists"
    (lists / "imgs").mkdir(parents=True)
    flat.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (20 + 7 * i, 30, 3), dtype=np.uint8)).save(flat / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (40, 25 + 3 * i), dtype=np.uint8)).save(lists / "imgs" / f"{i}.jpg")
    (lists / "test_x.txt").write_text("".join(f"imgs/{i}.jpg 0\n" for i in range(5)))
    out = tmp_path / "ood"
    assert main(["eval-ood", "--data", str(world["tree"]), "--classifier", str(world["clf"]), "--ood", str(flat),
                 f"near={lists / 'test_x.txt'}", "--workers", "0", "--out", str(out), "--device", "cpu"]) == 0
    rows = _rows(out / "results.csv")
    assert {(r["set"], r["group"]) for r in rows} == {("flat", "far"), ("test_x", "near")}
    assert all(0 <= float(r["auroc"]) <= 1 for r in rows)

    out = tmp_path / "cert"  # --limit: one image per class (stratified), not the first three files
    assert main(["certify", "--data", str(world["tree"]), "--classifier", str(world["clf"]), "--sigma", "0.25",
                 "--n", "40", "--n0", "8", "--limit", "3", "--workers", "1", "--out", str(out), "--quiet",
                 "--device", "cpu"]) == 0
    cert = _rows_tsv(out / "clf" / "sigma_0.25" / "certify.tsv")
    assert sorted(int(r["label"]) for r in cert) == [0, 1, 2]


def _rows_tsv(path):
    with open(path) as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _reference_logits(model, files):
    """Each file decoded with PIL and brought to the classifier's size by hand (v2 functional ops), one by one."""
    from torchvision.transforms.v2 import functional as F

    out = []
    for f in files:
        x = F.pil_to_tensor(Image.open(f).convert("RGB"))
        x = F.center_crop(F.resize(x, [round(SIZE / 0.875)], antialias=True), [SIZE])
        out.append(model(x[None].float() / 255))
    return torch.cat(out)


def test_subset_classes_are_matched_by_name_and_scored_on_their_logits(tmp_path):
    """A 2-class ImageNet-C set (classes 0 and 2 of a 3-class classifier): accuracy over those two logits, equal
    to a reference computed file by file."""
    clf = create_classifier("small_cnn", 3, 3, seed=1, image_size=SIZE)
    save_classifier(clf, tmp_path / "clf", extra={"classes": list(WNIDS)})
    inc = make_tree(tmp_path / "inc" / "fog", per_class={"3": 4}, odd_files=False, seed=2,
                    classes=(WNIDS[2], WNIDS[0])).parent
    out = tmp_path / "o"
    assert main(["eval-shift", "--data", str(inc), "--classifier", str(tmp_path / "clf"), "--modes", "default",
                 "--severities", "3", "--no-analyses", "--batch", "3", "--workers", "0", "--out", str(out),
                 "--quiet", "--device", "cpu"]) == 0
    (row,) = _rows(out / "results.csv")
    model = load_classifier(tmp_path / "clf")
    folders = sorted(p for p in (inc / "fog" / "3").iterdir())  # n01440764 (label 0), n01484850 (label 1)
    files = [f for d in folders for f in sorted(d.iterdir())]
    labels = torch.tensor([k for k, d in enumerate(folders) for _ in sorted(d.iterdir())])
    with torch.no_grad():
        pred = _reference_logits(model, files)[:, [0, 2]].argmax(1)
    assert row["n"] == str(len(files)) and float(row["accuracy"]) == pytest.approx((pred == labels).float().mean())


def test_a_set_with_classes_the_classifier_lacks_is_refused_naming_them(world, tmp_path, capsys):
    other = make_tree(tmp_path / "other", per_class={"x": 1}, odd_files=False, classes=("n09999999", WNIDS[0]))
    for argv in (["eval-shift", "--data", str(other / "x"), "--corruptions", "fog", "--modes", "default",
                  "--no-analyses"],
                 ["certify", "--data", str(other / "x"), "--sigma", "0.25"]):
        out = tmp_path / "o"
        assert main([*argv, "--classifier", str(world["clf"]), "--workers", "0", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert "does not know 1 classes" in err and "n09999999" in err and len(err.splitlines()) == 1
        assert not out.exists()


@pytest.mark.parametrize("command", [
    ["eval-shift", "--corruptions", "fog", "--modes", "default"],
    ["eval-ood"],
    ["certify", "--sigma", "0.25"],
])
@pytest.mark.parametrize("extra, message", [
    (["--workers", "-1"], "workers must be a whole number >= 0"),
    (["--image-size", "0"], "image size must be a whole number >= 1"),
])
def test_bad_workers_and_size_fail_before_any_output(world, tmp_path, capsys, command, extra, message):
    out = tmp_path / "o"
    assert main([*command, "--data", str(world["tree"]), "--classifier", str(world["clf"]), *extra,
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("command, way_out", [
    (["certify", "--sigma", "0.25"], "or drop --denoiser"),
    (["eval-shift", "--corruptions", "fog", "--modes", "default,de"], "or evaluate --modes default"),
])
def test_a_denoiser_of_other_channels_is_named_with_the_fix(world, tmp_path, capsys, command, way_out):
    out = tmp_path / "o"
    assert main([*command, "--data", str(world["tree"]), "--classifier", str(world["clf"]), "--denoiser", "digits",
                 "--workers", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not out.exists(), err
    assert "the denoiser takes 1-channel images but" in err and "has 3; pass --denoiser a model trained" in err
    assert way_out in err


def test_a_model_json_without_input_size_still_loads_and_asks_for_one_on_a_folder(world, tmp_path, capsys):
    old = tmp_path / "old"
    old.mkdir()
    spec = json.loads((world["clf"] / "model.json").read_text())
    del spec["image_size"]
    (old / "model.json").write_text(json.dumps(spec))
    (old / "model.safetensors").write_bytes((world["clf"] / "model.safetensors").read_bytes())
    model = load_classifier(old)
    assert input_size(model) is None and input_size(load_classifier(world["clf"])) == SIZE
    out = tmp_path / "o"
    assert main(["eval-ood", "--data", str(world["tree"]), "--classifier", str(old), "--workers", "0",
                 "--out", str(out)]) == 2
    assert "--image-size" in capsys.readouterr().err and not out.exists()
    assert main(["eval-ood", "--data", str(world["tree"]), "--classifier", str(old), "--workers", "0",
                 "--image-size", str(SIZE), "--out", str(out), "--device", "cpu"]) == 0
    a = [(r["score"], r["auroc"]) for r in _rows(out / "results.csv")]
    assert main(["eval-ood", "--data", str(world["tree"]), "--classifier", str(world["clf"]), "--workers", "0",
                 "--out", str(tmp_path / "new"), "--device", "cpu"]) == 0
    assert a == [(r["score"], r["auroc"]) for r in _rows(tmp_path / "new" / "results.csv")]


def test_timm_vit_is_built_for_its_size_and_pretrained_models_keep_their_normalisation(tmp_path):
    vit = create_classifier("vit_tiny_patch16_224", 3, 3, seed=0, image_size=64).eval()
    assert vit(torch.rand(2, 3, 64, 64)).shape == (2, 3) and vit.spec["image_size"] == 64
    save_classifier(vit, tmp_path / "vit")
    assert load_classifier(tmp_path / "vit")(torch.rand(1, 3, 64, 64)).shape == (1, 3)
    for name, head, mean, std in (("resnet10t", "fc", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                                  ("torchvision:mobilenet_v3_small", "classifier.3", (0.485, 0.456, 0.406),
                                   (0.229, 0.224, 0.225))):
        scratch = create_classifier(name, 3, 3, seed=0)
        assert scratch.mean.flatten().tolist() == [0.5] * 3  # trained from scratch: as before
        weights = tmp_path / f"{name.replace(':', '_')}.pt"  # a bare backbone's checkpoint, as published
        torch.save({**scratch.features.state_dict(), **{f"{head}.{k}": v for k, v in scratch.head.state_dict().items()}},
                   weights)
        tuned = create_classifier(name, 3, 3, seed=0, checkpoint_path=weights)
        torch.testing.assert_close(tuned.mean.flatten(), torch.tensor(mean))
        torch.testing.assert_close(tuned.std.flatten(), torch.tensor(std))
        save_classifier(tuned, tmp_path / name.replace(":", "_"))
        torch.testing.assert_close(load_classifier(tmp_path / name.replace(":", "_")).mean, tuned.mean)


def test_stratified_sample_is_proportional_seeded_and_without_repeats():
    labels = np.repeat([0, 1, 2, 3], [50, 30, 15, 5])
    for n in (1, 7, 10, 33, 99):
        idx = stratified_sample(labels, n, seed=3)
        assert len(idx) == n == len(set(idx.tolist())) and np.all(np.diff(idx) > 0)
        counts = np.bincount(labels[idx], minlength=4)
        assert np.all(np.abs(counts - n * np.array([50, 30, 15, 5]) / 100) < 1)
        np.testing.assert_array_equal(idx, stratified_sample(labels, n, seed=3))
    assert not np.array_equal(stratified_sample(labels, 10, 0), stratified_sample(labels, 10, 1))
    np.testing.assert_array_equal(stratified_sample(labels, 500), np.arange(100))


def test_bad_ood_sets_fail_in_one_line_before_any_output(world, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "list.txt").write_text("imgs/a.jpg 0\nimgs/missing.jpg 1\n")
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(tmp_path / "imgs" / "a.jpg")
    for ood, message in ((str(empty), "holds no images"), (str(tmp_path / "list.txt"), "line 2")):
        out = tmp_path / "o"
        assert main(["eval-ood", "--data", str(world["tree"]), "--classifier", str(world["clf"]), "--ood", ood,
                     "--workers", "0", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and not out.exists()


def test_holdout_on_a_folder_is_the_test_images_of_the_classes_left_out(world, tmp_path):
    clf = create_classifier("small_cnn", 2, 3, seed=0, image_size=SIZE)
    save_classifier(clf, tmp_path / "clf", extra={"classes": list(WNIDS[:2]), "class_indices": [0, 1]})
    out = tmp_path / "o"
    assert main(["eval-ood", "--data", str(world["tree"]), "--classifier", str(tmp_path / "clf"), "--workers", "0",
                 "--out", str(out), "--device", "cpu"]) == 0
    rows = _rows(out / "results.csv")
    assert {(r["set"], r["group"]) for r in rows} == {("holdout", "near"), ("noise", "far")}


@pytest.mark.slow
def test_torchrun_shards_streamed_conditions_and_images_and_matches_one_process(world, tmp_path):
    import os
    import subprocess
    import sys

    args = ["eval-shift", "--data", str(world["tree"]), "--classifier", str(world["clf"]), "--denoiser",
            str(world["den"]), "--modes", "default,de", "--corruptions", "fog", "--severities", "5", "--batch", "2",
            "--workers", "0", "--no-analyses", "--quiet", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "diffaug.cli", *args, "--out", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0

    def rows(folder):
        return [(r["corruption"], r["mode"], r["n"], r["accuracy"]) for r in _rows(folder / "results.csv")]

    # 9 test images in 5 batches of 2 per condition, spread over both ranks: pooled, the same numbers
    assert rows(tmp_path / "ddp") == rows(tmp_path / "one") and [r[2] for r in rows(tmp_path / "one")] == ["9"] * 4


def test_ood_scores_are_never_fitted_on_the_test_images(tmp_path, monkeypatch):
    from diffaug.evaluate import ood as eval_ood
    from diffaug.data import open_splits

    tree = make_tree(tmp_path / "imagenet", {"train": 6, "val": 2}, odd_files=False)  # ImageNet: no test/
    splits = open_splits(tree)
    assert splits["val"] is splits["test"]
    monkeypatch.setattr(eval_ood, "FIT_IMAGES", 10)
    fit = eval_ood.fit_split(splits, seed=0)
    fitted = {p for p, _ in fit.samples}
    assert len(fitted) == 10 and not fitted & {p for p, _ in splits["test"].samples}
    assert fitted <= {p for p, _ in splits["train"].samples}
    assert sorted(fit.labels.tolist()) == sorted(splits["train"].labels[  # stratified: the classes in proportion
        torch.as_tensor(stratified_sample(splits["train"].labels.numpy(), 10, 0))].tolist())
    with_test = open_splits(make_tree(tmp_path / "three", {"train": 4, "val": 2, "test": 2}, odd_files=False))
    assert eval_ood.fit_split(with_test) is with_test["val"]


def test_a_convolutional_denoiser_runs_at_the_classifiers_size(world, tmp_path):
    """A denoiser built for 8-px images serves a 16-px classifier in eval-shift (DE) and certify (DDS): the UNet
    takes any multiple of its downsampling (as ADM-256 on 224-px crops), so nothing is resized."""
    small = write_rgb_denoiser(tmp_path / "den8", 8)
    assert main(["eval-shift", "--data", str(world["inc"]), "--classifier", str(world["clf"]), "--denoiser",
                 str(small), "--modes", "default,de", "--severities", "5", "--batch", "3", "--workers", "0",
                 "--no-analyses", "--out", str(tmp_path / "shift"), "--quiet", "--device", "cpu"]) == 0
    assert [r["mode"] for r in _rows(tmp_path / "shift" / "results.csv")] == ["default", "de"]
    assert main(["certify", "--data", str(world["tree"]), "--classifier", str(world["clf"]), "--denoiser",
                 str(small), "--sigma", "0.25", "--n0", "5", "--n", "20", "--limit", "2", "--out",
                 str(tmp_path / "cert"), "--device", "cpu"]) == 0


def test_clean_only_and_a_partial_imagenet_c_is_said(world, tmp_path, capsys):
    """--corruptions none scores the clean images only (ImageNet-R / -A / -V2's metric); an ImageNet-C folder
    holding some of the 15 corruptions is warned about and the table says what its means are over."""
    out = tmp_path / "clean"
    assert main(["eval-shift", "--data", str(world["tree"]), "--classifier", str(world["clf"]), "--modes", "default",
                 "--corruptions", "none", "--no-analyses", "--workers", "0", "--out", str(out), "--quiet"]) == 0
    assert [r["corruption"] for r in _rows(out / "results.csv")] == ["clean"]
    assert main(["eval-shift", "--data", str(world["tree"]), "--classifier", str(world["clf"]), "--modes", "default",
                 "--corruptions", "none", "--workers", "0", "--out", str(tmp_path / "x")]) == 2
    assert "pass --no-analyses with --corruptions none" in capsys.readouterr().err
    assert main(["eval-shift", "--data", str(world["inc"]), "--classifier", str(world["clf"]), "--modes", "default",
                 "--corruptions", "none", "--no-analyses", "--out", str(tmp_path / "y")]) == 2
    assert "corrupted images only" in capsys.readouterr().err
    out = tmp_path / "partial"
    assert main(["eval-shift", "--data", str(world["inc"]), "--classifier", str(world["clf"]), "--modes", "default",
                 "--severities", "5", "--no-analyses", "--workers", "0", "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "holds 1 of the 15 corruptions" in err and "missing gaussian_noise" in err
    assert "Corrupted means are over 1 corruptions: fog (1 of the 15 standard)" in (out / "table.md").read_text()
    own = tmp_path / "own"  # the ImageNet-C layout with a corruption of the user's own: scored, and said
    shutil.copytree(world["inc"] / "fog", own / "my_blur")
    assert main(["eval-shift", "--data", str(own), "--classifier", str(world["clf"]), "--modes", "default",
                 "--severities", "5", "--no-analyses", "--workers", "0", "--out", str(out / "own"), "--quiet"]) == 0
    assert ("holds none of the 15 corruptions of --corruptions all; scoring the 1 it holds (my_blur)"
            in capsys.readouterr().err)
    assert "my_blur (0 of the 15 standard)" in (out / "own" / "table.md").read_text()


def test_classifiers_trained_on_some_classes_are_scored_on_those_classes_of_their_data(world, tmp_path, capsys):
    """diffaug train --classes (the near-OOD protocol): eval-shift and certify score such a classifier on the
    classes it knows of its own data (they refused: 'does not know 1 classes' / 'evaluate it on the data it was
    trained for'); classifiers of different subsets are refused in one line."""
    sub = tmp_path / "sub"
    assert main(["train", "--data", str(world["tree"]), "--recipe", "plain", "--model", "small_cnn", "--image-size",
                 str(SIZE), "--steps", "2", "--batch-size", "8", "--workers", "0", "--classes", "0", "2",
                 "--out", str(sub), "--quiet"]) == 0
    digits = tmp_path / "digits-sub"
    assert main(["train", "--data", "digits", "--recipe", "plain", "--steps", "2", "--classes", "0", "1", "2",
                 "--out", str(digits), "--quiet"]) == 0
    for data, clf, n in ((world["tree"], sub, 6), ("digits", digits, None)):
        out = tmp_path / f"shift-{clf.name}"
        assert main(["eval-shift", "--data", str(data), "--classifier", str(clf), "--modes", "default",
                     "--corruptions", "fog", "--severities", "1", "--no-analyses", "--workers", "0", "--out", str(out),
                     "--quiet"]) == 0
        rows = _rows(out / "results.csv")
        assert n is None or rows[0]["n"] == str(n)  # 3 test images of each of the 2 classes
        out = tmp_path / f"cert-{clf.name}"
        assert main(["certify", "--data", str(data), "--classifier", str(clf), "--sigma", "0.25", "--n", "20",
                     "--n0", "4", "--limit", "4", "--workers", "0", "--out", str(out), "--quiet"]) == 0
        labels = {int(r["label"]) for r in _rows_tsv(out / clf.name / "sigma_0.25" / "certify.tsv")}
        assert labels <= {0, 1, 2}
    capsys.readouterr()
    assert main(["eval-shift", "--data", str(world["tree"]), "--classifier", str(sub), str(world["clf"]), "--modes",
                 "default", "--corruptions", "fog", "--no-analyses", "--out", str(tmp_path / "mixed")]) == 2
    assert "trained on different classes" in capsys.readouterr().err


def test_the_evaluations_can_skip_a_broken_file(world, tmp_path, capsys):
    """A truncated JPEG in an OOD folder (scraped sets often hold some) stops eval-ood naming it and the flag that
    skips it; --on-bad-file skip (eval-ood, eval-shift, certify) scores the next image in its place."""
    ood = tmp_path / "ood"
    ood.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(ood / f"{i}.jpg")
    data = (ood / "1.jpg").read_bytes()
    (ood / "1.jpg").write_bytes(data[: len(data) // 2])
    args = ["--data", str(world["tree"]), "--classifier", str(world["clf"]), "--workers", "0"]
    assert main(["eval-ood", *args, "--ood", str(ood), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "1.jpg" in err and "--on-bad-file skip of train, eval-shift, eval-ood and certify" in err
    assert main(["eval-ood", *args, "--ood", str(ood), "--on-bad-file", "skip", "--out", str(tmp_path / "b")]) == 0
    assert "1.jpg" in capsys.readouterr().err  # each skipped file is named
    for command in (["eval-shift", "--modes", "default", "--corruptions", "fog", "--severities", "1",
                     "--no-analyses"], ["certify", "--sigma", "0.25", "--n", "10", "--n0", "2", "--limit", "2"]):
        assert main([*command, *args, "--on-bad-file", "skip", "--out", str(tmp_path / command[0]), "--quiet"]) == 0


def test_certify_names_a_corrupted_root_with_the_condition_to_give(world, tmp_path, capsys):
    assert main(["certify", "--data", str(world["inc"]), "--classifier", str(world["clf"]), "--sigma", "0.25",
                 "--out", str(tmp_path / "o")]) == 2
    assert "ImageNet-C root" in capsys.readouterr().err and not (tmp_path / "o").exists()
    (tmp_path / "c10c").mkdir()
    np.save(tmp_path / "c10c" / "labels.npy", np.zeros(5, np.uint8))
    assert main(["certify", "--data", str(tmp_path / "c10c"), "--classifier", str(world["clf"]), "--sigma", "0.25",
                 "--out", str(tmp_path / "o")]) == 2
    assert "CIFAR-10-C .npy files, which certify does not read" in capsys.readouterr().err


def test_certify_records_the_label_of_the_image_it_scored_when_a_bad_file_is_skipped(tmp_path):
    """--on-bad-file skip scores the next image in place of a bad one: the row must carry that image's label."""
    from diffaug import Smooth
    from diffaug.data import ImageFiles
    from diffaug.evaluate.certify import StreamedImages, certify_images
    from diffaug.evaluate.sets import eval_view

    for name in ("a", "bad", "b"):
        Image.fromarray(np.full((8, 8), 60, np.uint8)).save(tmp_path / f"{name}.jpg")
    data = (tmp_path / "bad.jpg").read_bytes()
    (tmp_path / "bad.jpg").write_bytes(data[: len(data) // 2])
    files = ImageFiles([(str(tmp_path / "a.jpg"), 0), (str(tmp_path / "bad.jpg"), 0), (str(tmp_path / "b.jpg"), 1)],
                       ["a", "b"], channels=1, on_bad_file="skip")
    view = eval_view(files, None)

    class One(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([[0.0, 1.0]]).expand(x.shape[0], 2)

    out = tmp_path / "c.tsv"
    certify_images(Smooth(One(), 2, 0.25), StreamedImages(view, "cpu", 0), view.labels, out, n0=2, n=20,
                   alpha=0.001, batch_size=20, seed=0, indices=[1])
    (row,) = _rows_tsv(out)
    assert row["idx"] == "1" and row["label"] == "1" and row["correct"] == "1"  # b.jpg's label, not bad.jpg's 0


def test_colour_folders_need_a_colour_denoiser_and_guidance_remembers_its_own(world, tmp_path, capsys):
    """A colour folder beside the 1-channel digits default is refused (train-guidance trained a gray 8-px
    classifier on it, silently); eval-guidance / sample / pag take the denoiser and data a guidance classifier
    records; other data, another denoiser or a recorded path not found here are one line each."""
    tree, den = world["tree"], world["den"]
    for argv in (["train-guidance", "--kind", "da", "--data", str(tree), "--steps", "1", "--out", str(tmp_path / "g0")],
                 ["train", "--data", str(tree), "--recipe", "diffaug", "--denoiser", "digits", "--steps", "1", "--out",
                  str(tmp_path / "c0")],
                 ["pag", "--classifier", str(world["clf"]), "--data", str(tree), "--out", str(tmp_path / "p0.png")]):
        assert main([*argv, "--workers", "0"]) == 2
        err = capsys.readouterr().err.strip()
        assert "holds colour images but the denoiser takes 1-channel images" in err and len(err.splitlines()) == 1
    assert main(["train", "--data", str(tree), "--recipe", "diffaug", "--denoiser", str(den), "--model", "small_cnn",
                 "--image-size", str(SIZE), "--steps", "1", "--batch-size", "8", "--workers", "0", "--quiet", "--out",
                 str(tmp_path / "c1")]) == 0
    # the README's `pag --classifier PLAIN DIFFAUG`: the data both record, the denoiser the DiffAug one records
    assert main(["pag", "--classifier", str(world["clf"]), str(tmp_path / "c1"), "--n", "2", "--workers", "0",
                 "--out", str(tmp_path / "p1.png"), "--quiet"]) == 0  # (was: digits for both)
    assert (tmp_path / "p1.png").stat().st_size > 0
    g = tmp_path / "g"
    assert main(["train-guidance", "--kind", "da", "--data", str(tree), "--denoiser", str(den), "--steps", "2",
                 "--batch-size", "8", "--width", "8", "--workers", "0", "--out", str(g), "--quiet"]) == 0
    assert main(["eval-guidance", "--guidance", str(g), "--no-generation", "--workers", "0", "--out",
                 str(tmp_path / "eg"), "--quiet"]) == 0  # the recorded denoiser and data (was: digits)
    assert json.loads((tmp_path / "eg" / "results.json").read_text())["accuracy_over_t"]
    assert main(["sample", "--guidance", str(g), "--class", "1", "--n", "2", "--steps", "2", "--out",
                 str(tmp_path / "s.png"), "--quiet"]) == 0
    assert main(["sample", "--guidance", str(g), "--class", WNIDS[1], "--n", "2", "--steps", "2", "--out",
                 str(tmp_path / "s_name.png"), "--quiet"]) == 0  # by name: the same images
    assert (tmp_path / "s_name.png").read_bytes() == (tmp_path / "s.png").read_bytes()
    capsys.readouterr()
    assert main(["sample", "--guidance", str(g), "--class", "zebra", "--out", str(tmp_path / "z.png")]) == 2
    assert f"--class zebra does not exist; the guidance classifier has classes 0..{len(WNIDS) - 1} ({WNIDS[0]}, " \
        in capsys.readouterr().err
    cases = [(["eval-guidance", "--guidance", str(g), "--data", "digits", "--no-generation", "--out",
               str(tmp_path / "eg2")], f"trained on {len(WNIDS)} classes of 3-channel images, digits has 10 of 1"),
             (["sample", "--guidance", str(g), "--denoiser", "digits", "--class", "1", "--out", str(tmp_path / "d.png")],
              f"the denoiser makes 1x[16, 16]; pass --denoiser {den} (the one it was trained with)")]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    spec = json.loads((g / "guidance.json").read_text())
    (g / "guidance.json").write_text(json.dumps({**spec, "denoiser": "moved/den"}))  # trained in another folder
    assert main(["sample", "--guidance", str(g), "--class", "1", "--out", str(tmp_path / "m.png")]) == 2
    assert "records --denoiser moved/den (guidance.json), which is not found from here; pass --denoiser" in \
        capsys.readouterr().err
