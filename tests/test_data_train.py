"""`diffaug train` on a streamed image folder: a torchvision ResNet-18 at 64 px, DiffAug views, resume, bad files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from imagenet_tree import make_tree

from diffaug import InputError, load_classifier
from diffaug.utils.checkpoint import load_safetensors, read_jsonl
from diffaug.cli import main
from diffaug.train.classifier import TrainConfig, train_classifier


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("imagenet"), {"train": 12, "val": 4})


@pytest.fixture(scope="module")
def den16(tmp_path_factory):
    """A tiny RGB denoiser for 16-px crops."""
    from conftest import write_rgb_denoiser

    return write_rgb_denoiser(tmp_path_factory.mktemp("den16"))


def test_a_torchvision_resnet18_trains_at_64px_on_the_tree(tree, tmp_path, capsys):
    cfg = TrainConfig(data=str(tree), recipe="plain", model="torchvision:resnet18", image_size=64, workers=0,
                      steps=3, batch_size=6, lr=3e-3, checkpoint_every=3)
    train_classifier(cfg, tmp_path / "run", progress=True)
    out = capsys.readouterr().out
    assert "split folders: train 40, val 12, test 12 images, 3 classes" in out
    spec = json.loads((tmp_path / "run" / "model.json").read_text())
    assert spec["name"] == "torchvision:resnet18" and spec["image_size"] == 64
    assert spec["split_sizes"] == {"train": 40, "val": 12, "test": 12}
    assert spec["classes"] == sorted(p.name for p in (tree / "train").iterdir())
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 3]
    clf = load_classifier(tmp_path / "run")
    assert clf(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))).shape == (2, 3)


def test_a_class_subset_prints_the_sizes_it_trains_on(tree, tmp_path, capsys):
    cfg = TrainConfig(data=str(tree), recipe="plain", model="small_cnn", image_size=16, workers=0, steps=1,
                      batch_size=4, checkpoint_every=1, classes=[0, 2])
    train_classifier(cfg, tmp_path / "run", progress=True)
    sizes = json.loads((tmp_path / "run" / "model.json").read_text())["split_sizes"]
    assert sizes["train"] < 40  # two of the three classes
    line = f"data: classes [0, 2] kept: train {sizes['train']}, val {sizes['val']}, test {sizes['test']} images"
    assert line in capsys.readouterr().out


def test_training_on_a_streamed_folder_learns_above_chance(tree, tmp_path):
    cfg = TrainConfig(data=str(tree), recipe="plain", model="small_cnn", image_size=16, workers=0, steps=30,
                      batch_size=10, lr=3e-3, checkpoint_every=30)
    train_classifier(cfg, tmp_path / "run", progress=False)
    spec = json.loads((tmp_path / "run" / "model.json").read_text())
    assert spec["test_acc"] >= 0.75, spec  # 3 classes: chance 1/3; P(>= 9 of 12 right by chance) < 0.4 %


@pytest.mark.parametrize("view", ["center", "same"])
def test_diffaug_is_applied_to_the_chosen_view(tree, den16, monkeypatch, view):
    from diffaug.recipes import Recipe
    from diffaug.data import SeededView, eval_transform, open_splits, train_transform

    seen = []
    original = Recipe.forward

    def spy(self, x, y, generator=None, *, x_diffaug=None, x_aligned=()):
        seen.append((x.clone(), None if x_diffaug is None else x_diffaug.clone()))
        return original(self, x, y, generator, x_diffaug=x_diffaug, x_aligned=x_aligned)

    monkeypatch.setattr(Recipe, "forward", spy)
    cfg = TrainConfig(data=str(tree), recipe="diffaug", denoiser=str(den16), model="resnet_small", image_size=16,
                      workers=0, steps=1, batch_size=4, checkpoint_every=1, diffaug_view=view)
    train_classifier(cfg, tree.parent / f"run-{view}", progress=False)
    (x, x_da), = seen
    from diffaug.data import ResumableSampler

    order = ResumableSampler(40, seed=0, drop_last=True).indices()[:4]
    train = open_splits(tree)["train"]
    crops = SeededView(train, train_transform(16), eval_transform(16))
    assert torch.equal(x, torch.stack([crops[(0, i)][0] for i in order]))
    if view == "center":
        assert torch.equal(x_da, torch.stack([SeededView(train, eval_transform(16))[i][0] for i in order]))
    else:
        assert x_da is None


def _cli(args, kill_at=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("DIFFAUG_TEST_KILL_AT_WRITE", None)
    if kill_at is not None:
        env["DIFFAUG_TEST_KILL_AT_WRITE"] = kill_at
    return subprocess.run([sys.executable, "-m", "diffaug.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bitwise_equal(tree, den16, tmp_path):
    args = ["train", "--data", str(tree), "--recipe", "diffaug", "--denoiser", str(den16), "--model",
            "resnet_small", "--image-size", "16", "--steps", "6", "--batch-size", "8", "--checkpoint-every", "1",
            "--quiet", "--device", "cpu", "--out"]
    assert _cli(args + [str(tmp_path / "ref"), "--workers", "2"]).returncode == 0
    cut = tmp_path / "cut"
    killed = _cli(args + [str(cut), "--workers", "2"], kill_at="5+")  # right after the step-2 checkpoint
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    steps = [int(p.stem[5:]) for p in (cut / "checkpoints").iterdir()]
    assert steps and max(steps) % 5, steps  # killed mid-epoch (5 steps an epoch), after a checkpoint
    done = _cli(args + [str(cut), "--resume", "--workers", "0"])  # another worker count: the same batches
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = load_safetensors(tmp_path / "ref" / "model.safetensors")[0], load_safetensors(cut / "model.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_jsonl(cut / "metrics.jsonl")] == [r["step"] for r in
                                                                       read_jsonl(tmp_path / "ref" / "metrics.jsonl")]


def test_bad_files_stop_with_the_name_or_are_skipped_and_counted(tmp_path):
    root = make_tree(tmp_path / "t", {"train": 4, "val": 2}, odd_files=False)
    bad = sorted((root / "train").rglob("*.JPEG"))[3]
    bad.write_bytes(bad.read_bytes()[:100])
    cfg = dict(data=str(root), recipe="plain", model="resnet_small", image_size=16, workers=0, steps=3,
               batch_size=4, checkpoint_every=3)
    with pytest.raises(InputError, match=f"cannot read image {bad}"):
        train_classifier(TrainConfig(**cfg), tmp_path / "strict", progress=False)
    assert not (tmp_path / "strict" / "model.json").exists()
    train_classifier(TrainConfig(**cfg, on_bad_file="skip"), tmp_path / "skip", progress=False)
    rows = read_jsonl(tmp_path / "skip" / "metrics.jsonl")
    assert rows[-1]["bad_files_skipped"] == 1 and rows[-2]["bad_files_skipped"] == 1  # 3 steps x 4 of 12 images


def test_streaming_flags_are_checked_before_any_output(tree, tmp_path, capsys):
    base = ["train", "--data", str(tree), "--recipe", "plain", "--steps", "1", "--quiet", "--device", "cpu"]
    for extra, message in ((["--image-size", "0"], "image size must be a whole number >= 1, got 0"),
                           (["--workers", "-1"], "workers must be a whole number >= 0"),
                           (["--diffaug-view", "left"], "unknown DiffAug view 'left'; use one of center, same"),
                           (["--on-bad-file", "ignore"], "unknown bad-file policy 'ignore'")):
        out = tmp_path / "o"
        assert main(base + extra + ["--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
        assert not out.exists()
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    assert main(["train", "--data", str(tmp_path / "empty"), "--recipe", "plain", "--steps", "1", "--out",
                 str(tmp_path / "o2")]) == 2
    assert "holds no images" in capsys.readouterr().err and not (tmp_path / "o2").exists()
