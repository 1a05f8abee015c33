"""The same seed gives bitwise-identical augmentations, training and evaluation results on CPU."""

import csv

import torch

import diffaug
from diffaug.classifier import create_classifier, save_classifier
from diffaug.cli import main
from diffaug.train.classifier import TrainConfig, train_classifier


def test_augmentations_repeat_bitwise(den, images):
    aug = diffaug.DiffAug(den)
    a = aug(images, generator=torch.Generator().manual_seed(5))
    b = aug(images, generator=torch.Generator().manual_seed(5))
    c = aug(images, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    clf = create_classifier("small_cnn", 10, 1, seed=0).eval()
    p = diffaug.diffaug_ensemble(clf, den, images, generator=torch.Generator().manual_seed(1))
    q = diffaug.diffaug_ensemble(clf, den, images, generator=torch.Generator().manual_seed(1))
    assert torch.equal(p, q)


def test_training_repeats_bitwise(tmp_path, den_dir):
    cfg = TrainConfig(recipe="augmix+diffaug", denoiser=str(den_dir), steps=3, batch_size=16, seed=4)
    a = train_classifier(cfg, tmp_path / "a", progress=False).state_dict()
    b = train_classifier(cfg, tmp_path / "b", progress=False).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _rows(path, drop=("seconds_per_image", "time")):
    with open(path) as f:
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(f, delimiter="\t" if
                                                                                      path.suffix == ".tsv" else ",")]


def test_evaluations_repeat_bitwise(tmp_path, den_dir):
    save_classifier(create_classifier("small_cnn", 10, 1, seed=0), tmp_path / "clf")
    for run in ("a", "b"):
        assert main(["eval-shift", "--classifier", str(tmp_path / "clf"), "--denoiser", str(den_dir),
                     "--corruptions", "fog,gaussian_noise", "--severities", "5", "--limit", "8", "--dda-steps", "2",
                     "--no-analyses", "--quiet", "--out", str(tmp_path / f"shift-{run}")]) == 0
        assert main(["certify", "--classifier", str(tmp_path / "clf"), "--denoiser", str(den_dir), "--sigma", "0.5",
                     "--n0", "5", "--n", "20", "--batch", "20", "--limit", "3", "--quiet",
                     "--out", str(tmp_path / f"cert-{run}")]) == 0
        assert main(["eval-ood", "--classifier", str(tmp_path / "clf"), "--out", str(tmp_path / f"ood-{run}")]) == 0
    assert _rows(tmp_path / "shift-a" / "results.csv") == _rows(tmp_path / "shift-b" / "results.csv")
    tsv = "clf/sigma_0.5/certify.tsv"
    assert _rows(tmp_path / "cert-a" / tsv) == _rows(tmp_path / "cert-b" / tsv)
    assert _rows(tmp_path / "ood-a" / "results.csv") == _rows(tmp_path / "ood-b" / "results.csv")


def test_loading_models_leaves_the_global_rng_alone(tmp_path, den_dir, monkeypatch):
    """Loaders build each network before its weights arrive; that initialisation must not draw from (and so shift)
    the caller's global RNG, nor reseed the GPUs' (torch.manual_seed would: stood in for here, no GPU needed)."""
    save_classifier(create_classifier("small_cnn", 10, 1, seed=0), tmp_path / "clf")
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    rng = torch.get_rng_state()
    diffaug.load_denoiser(den_dir)
    diffaug.load_classifier(tmp_path / "clf")
    assert torch.equal(torch.get_rng_state(), rng) and not reseeded

