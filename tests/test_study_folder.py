"""The study on an image folder (issue 17): every stage streams a synthetic ImageNet-style tree (varying sizes, a
gray, a CMYK and PNG files) end to end; bad input stops in one line before any stage; eval-shift's --limit on a
folder is a class-stratified sample; read_sample holds only the sample it is asked for."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import write_rgb_denoiser
from diffaug.cli import main
from diffaug.data import SeededView, generative_transform, open_splits, read_sample, stratified_sample
from diffaug.study.stages import STAGES
from imagenet_tree import WNIDS, make_tree

SIZE = 16
TINY = {"seeds": [0], "recipes": ["plain", "diffaug"], "epochs": 1, "shift_limit": 6,
        "shift_corruptions": "gaussian_noise", "shift_severities": "5", "certify_sigmas": [0.5], "certify_n0": 4,
        "certify_n": 8, "certify_limit": 3, "guidance_steps": 4, "guidance_per_class": 2, "guidance_sample_steps": 2,
        "semi_steps": 4, "semi_fraction": 0.3, "toy_steps": 5, "image_size": SIZE, "batch_size": 8, "workers": 0}


def _rows(path, delimiter=","):
    with open(path) as f:
        return list(csv.DictReader(f, delimiter=delimiter))


def _config(tmp_path, den, **changes):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({**TINY, "denoiser": str(den), **changes}))  # changes may name another denoiser
    return cfg


@pytest.mark.slow
def test_study_runs_every_stage_on_an_image_folder_streamed(tmp_path, monkeypatch):
    from diffaug.data import memory

    def whole_folder(*args, **kwargs):  # the in-memory folder reader: no stage may read the folder whole
        raise AssertionError("a stage read the image folder whole into memory")

    monkeypatch.setattr(memory, "load_image_folder", whole_folder)
    tree = make_tree(tmp_path / "tree")  # train/ + val/, 3 classes, 24..72 px JPEGs, gray, CMYK, PNGs
    den = write_rgb_denoiser(tmp_path / "den", SIZE)
    out = tmp_path / "out"
    assert main(["study", "--data", str(tree), "--config", str(_config(tmp_path, den)), "--out", str(out),
                 "--quiet", "--device", "cpu"]) == 0

    results = json.loads((out / "results.json").read_text())
    assert all(results["stages"][s]["seconds"] is not None for s in STAGES)
    assert results["config"]["data"] == str(tree) and results["config"]["image_size"] == SIZE
    report = (out / "report.md").read_text()
    for name in ("report.html", "claims.png"):
        assert (out / name).stat().st_size > 0
    stages = out / "stages"
    for path in ("classifiers/plain-s0/model.json", "classifiers/diffaug-s0/model.json",
                 "augmentations/augmentations.png", "shift/results.csv", "shift/de_vs_t.png",
                 "shift/entropy_vs_t.png", "ood/all-classes/results.csv", "ood/holdout/eval/results.csv",
                 "certify/certified_accuracy.png", "guidance/eval/results.json", "guidance/eval/accuracy_vs_t.png",
                 "guidance/eval/samples_da_da-s0.png", "semi/table.md", "pag/pag.png", "toy/toy-s0.png"):
        assert (stages / path).stat().st_size > 0, path
    for stage in STAGES:
        assert f"## Stage: {stage}" in report, stage

    spec = json.loads((stages / "classifiers" / "plain-s0" / "model.json").read_text())
    assert spec["image_size"] == SIZE and spec["classes"] == list(WNIDS)
    shift = _rows(stages / "shift" / "results.csv")
    assert {r["corruption"] for r in shift} == {"clean", "gaussian_noise"} and {r["n"] for r in shift} == {"6"}
    assert {r["mode"] for r in shift} == {"default", "de", "dda", "dda-se"}
    # near-OOD: classifiers of classes 0 and 1; the held-out class's test images are the near set
    held = json.loads((stages / "ood" / "holdout" / "plain-s0" / "model.json").read_text())
    assert held["class_indices"] == [0, 1] and results["stages"]["ood"]["numbers"]["id_classes"] == [0, 1]
    assert {r["set"] for r in _rows(stages / "ood" / "holdout" / "eval" / "results.csv")} == {
        "holdout", "photo-patches", "noise"}
    cert = _rows(stages / "certify" / "plain-s0" / "sigma_0.5" / "certify.tsv", "\t")
    assert sorted(int(r["label"]) for r in cert) == [0, 1, 2]  # certify_limit 3: one per class
    guidance = json.loads((stages / "guidance" / "eval" / "results.json").read_text())
    assert {r["kind"] for r in guidance["accuracy_over_t"].values()} == {"noisy", "da", "clean"}
    for r in guidance["generation"].values():
        assert np.isfinite(r["fid"]) and 0 <= r["precision"] <= 1 and 0 <= r["accuracy"] <= 1
    assert "class-stratified sample of 9 test images" in report  # all 9 val images: fewer than the bound
    assert set(results["stages"]["semi"]["numbers"]["accuracy"]) == {"supervised", "consistency"}


def test_bad_study_input_on_a_folder_stops_in_one_line_before_any_stage(tmp_path, capsys):
    den = write_rgb_denoiser(tmp_path / "den", SIZE)  # a two-level UNet: it takes even sizes only
    tree = make_tree(tmp_path / "tree", {"train": 2, "val": 1}, odd_files=False)
    one = make_tree(tmp_path / "one", {"train": 2, "val": 1}, odd_files=False, classes=WNIDS[:1])
    two = make_tree(tmp_path / "two", {"train": 2, "val": 1}, odd_files=False, classes=WNIDS[:2])
    cases = ((tree, {"image_size": 15}, "setting image_size 15: the denoiser was built for 16x16 images and cannot "
                                        "run at 15x15"),
             (one, {}, "has 1 class; the study's near-OOD stage"),
             (two, {}, "has 2 classes; the study's near-OOD stage"),
             (tree, {"ood_id_classes": [2]}, "must name at least two in-distribution classes"),
             (tmp_path / "nowhere", {}, "data folder"),
             (tree, {"workers": -1}, "workers must be a whole number >= 0"),
             (tree, {"denoiser": "digits"}, "needs an RGB denoiser trained on it; digits takes 1-channel images"))
    for data, changes, message in cases:
        out = tmp_path / "out"
        assert main(["study", "--data", str(data), "--config", str(_config(tmp_path, den, **changes)),
                     "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (message, err)
        assert not out.exists()


def test_eval_shift_limit_on_a_folder_is_a_class_stratified_sample(tmp_path):
    """Classifier k always answers class k, so it scores the share of class k among the images --limit picks: on a
    test split of 6 / 2 / 1 images per class, --limit 3 takes 2 / 1 / 0 (the stratified sample; the fixed random
    subset of the in-memory sets would take 2 / 0 / 1) and --limit 5 takes 3 / 1 / 1."""
    from diffaug.classifier import create_classifier, save_classifier

    tree = make_tree(tmp_path / "tree", {"train": 2, "val": 6}, odd_files=False)
    for k, keep in enumerate((6, 2, 1)):
        for extra in sorted((tree / "val" / WNIDS[k]).iterdir())[keep:]:
            extra.unlink()
    folders = []
    for k in range(3):
        clf = create_classifier("small_cnn", 3, 3, seed=0, image_size=SIZE)
        with torch.no_grad():
            clf.head.weight.zero_()
            clf.head.bias.copy_(5.0 * torch.eye(3)[k])
        save_classifier(clf, tmp_path / f"always{k}", extra={"classes": list(WNIDS)})
        folders.append(str(tmp_path / f"always{k}"))
    for limit, counts in ((3, [2, 1, 0]), (5, [3, 1, 1])):
        out = tmp_path / f"o{limit}"
        assert main(["eval-shift", "--data", str(tree), "--classifier", *folders, "--modes", "default",
                     "--corruptions", "fog", "--severities", "1", "--no-analyses", "--limit", str(limit),
                     "--batch", "2", "--workers", "0", "--out", str(out), "--quiet", "--device", "cpu"]) == 0
        rows = _rows(out / "results.csv")
        assert len(rows) == 6 and all(r["n"] == str(limit) for r in rows)  # clean + fog, 3 classifiers
        for r in rows:
            k = int(r["classifier"][-1])
            assert float(r["accuracy"]) == pytest.approx(counts[k] / limit), (r, counts)


def test_read_sample_holds_a_stratified_sample_or_the_given_items(tmp_path):
    tree = make_tree(tmp_path / "tree", {"train": 4, "val": 1})
    train = open_splits(tree)["train"]
    transform = generative_transform(SIZE, flip=False)
    sample = read_sample(train, transform, 6, seed=3, batch_size=4, workers=0)
    idx = stratified_sample(train.labels.numpy(), 6, 3)
    assert sample.images.shape == (6, 3, SIZE, SIZE) and sample.classes == train.classes
    assert sample.labels.tolist() == train.labels[idx].tolist() and np.bincount(sample.labels).tolist() == [2, 2, 2]
    view = SeededView(train, transform)
    torch.testing.assert_close(sample.images, torch.stack([view[int(i)][0] for i in idx]), rtol=0, atol=0)
    picked = read_sample(train, transform, indices=[5, 0], workers=0)
    assert picked.labels.tolist() == [int(train.labels[5]), int(train.labels[0])]
    with pytest.raises(ValueError, match="exactly one of n"):
        read_sample(train, transform, 3, indices=[0])
    shutil.rmtree(tree)


def test_semi_table_cell_leaves_out_t_bins_without_test_images():
    from diffaug.study.stages import _bin_cell

    # found by a new-user run: a 12-image test split leaves some t-bins empty (accuracy None), which crashed the
    # semi-supervised stage's table
    assert _bin_cell([0.5, None, 0.7]) == "60 +- 14"
    assert _bin_cell([None, None]) == "-"
    assert _bin_cell([0.25]) == "25 +- 0"
