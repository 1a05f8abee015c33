"""Training commands on streamed folders: train-diffusion and train-guidance through the data layer, the denoiser
at another resolution, aligned copies / extra data / SyncBatchNorm, timm transforms, and the study on a folder."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
import torch.nn.functional as F
from imagenet_tree import WNIDS, make_tree

import diffaug
from diffaug import InputError
from diffaug.utils.checkpoint import read_safetensors


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("tree"), {"train": 4, "val": 2})


@pytest.fixture(scope="module")
def den16(tmp_path_factory):
    """A tiny RGB denoiser built for 16 px (two levels: it takes any even size)."""
    from conftest import write_rgb_denoiser

    return write_rgb_denoiser(tmp_path_factory.mktemp("den16"))


# ---------------------------------------------------------------------- train-diffusion
def _diffusion(tree, out, steps, resume=False):
    from diffaug.train.diffusion import DiffusionTrainConfig, train_diffusion

    cfg = DiffusionTrainConfig(data=str(tree), image_size=16, width=8, layers_per_block=1, steps=steps,
                               batch_size=4, workers=0, checkpoint_every=2, sample_grid=False, seed=3)
    return train_diffusion(cfg, out, resume=resume, progress=False)


def test_train_diffusion_streams_a_folder_of_any_image_size_and_resumes_bitwise(tree, tmp_path):
    den = _diffusion(tree, tmp_path / "whole", 4)
    assert den.image_size == (16, 16) and den.channels == 3 and den.num_classes == len(WNIDS)
    assert not (tmp_path / "whole" / "samples.png").exists()  # sample_grid=False
    meta = json.loads((tmp_path / "whole" / "diffaug.json").read_text())
    assert meta["classes"] == list(WNIDS)
    assert json.loads((tmp_path / "whole" / "train_config.json").read_text())["image_size"] == 16
    _diffusion(tree, tmp_path / "part", 2)
    _diffusion(tree, tmp_path / "part", 4, resume=True)
    a = read_safetensors(tmp_path / "whole" / "unet" / "diffusion_pytorch_model.safetensors")
    b = read_safetensors(tmp_path / "part" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_diffusion_refuses_a_size_its_unet_cannot_take_before_writing(tree, tmp_path):
    from diffaug.cli import main

    assert main(["train-diffusion", "--data", str(tree), "--image-size", "24", "--out", str(tmp_path / "o"),
                 "--quiet"]) == 2
    assert not (tmp_path / "o").exists()


def test_default_network_and_batch_are_sized_for_the_image():
    from diffaug.nets.unet import unet_config_for
    from diffaug.train.diffusion import default_batch_size

    assert [default_batch_size(s) for s in (8, 32, 64, 128, 256)] == [128, 128, 32, 8, 8]
    widths = [unet_config_for(s, 3)["block_out_channels"][0] for s in (8, 16, 32, 64)]
    assert widths == [32, 64, 128, 64]  # 8-32 px as before (the digits' denoiser); 64 px: half the width


# ---------------------------------------------------------------------- train-guidance
def test_train_guidance_streams_a_folder(tree, den16, tmp_path):
    from diffaug.guidance import load_guidance
    from diffaug.train.guidance import GuidanceTrainConfig, train_guidance

    cfg = GuidanceTrainConfig(kind="da", data=str(tree), denoiser=str(den16), steps=2, batch_size=4, width=8,
                              workers=0, labelled_fraction=0.5, consistency_weight=1.0)
    train_guidance(cfg, tmp_path / "g", progress=False)
    metrics = json.loads((tmp_path / "g" / "metrics.json").read_text())
    assert 0 <= metrics["accuracy"] <= 1
    spec = json.loads((tmp_path / "g" / "guidance.json").read_text())
    assert spec["image_size"] == [16, 16] and spec["classes"] == list(WNIDS)
    assert spec["labelled_images"] == 3 + 2 + 2  # half of each class's 6, 5, 5 training images, rounded to even
    load_guidance(tmp_path / "g", diffaug.load_denoiser(den16))


def test_train_guidance_refuses_a_size_the_denoiser_cannot_take(tree, den16, tmp_path):
    from diffaug.cli import main

    assert main(["train-guidance", "--kind", "noisy", "--data", str(tree), "--denoiser", str(den16),
                 "--image-size", "15", "--out", str(tmp_path / "g"), "--quiet"]) == 2
    assert not (tmp_path / "g").exists()


# ---------------------------------------------------------------------- the denoiser at another resolution
def test_a_convolutional_denoiser_runs_at_any_size_its_downsamplings_divide(den16):
    den = diffaug.load_denoiser(den16)
    assert den.size_multiple == 2
    den24 = den.at_size(24)
    x = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    t = torch.tensor([100, 700])
    with torch.no_grad():
        got = den24.predict_x0(x, t)
        eps = den.net.unet(x, t).sample  # the UNet itself, called directly: the reference
    a = den.alpha_bar[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(got, (x - (1 - a).sqrt() * eps) / a.sqrt(), rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="cannot run at 15x15.*--denoiser-size 16"):
        den.at_size(15)
    with pytest.raises(InputError, match="built for 16x16"):
        den.check_images(torch.rand(1, 3, 24, 24))  # the original keeps its size


def test_adm_size_multiple_follows_its_levels():
    from diffaug.nets.adm import ADMConfig, ADMUNet

    net = ADMUNet(ADMConfig(image_size=32, num_channels=32, num_res_blocks=1, channel_mult=(1, 2, 2),
                            attention_resolutions=(8,), num_heads=1))
    den = diffaug.Denoiser(net.eval(), torch.linspace(0.99, 0.01, 50), image_size=(32, 32), channels=3)
    assert den.size_multiple == 4 and den.accepts_size(24) and not den.accepts_size(26)
    with torch.no_grad():
        assert den.at_size(24).predict_x0(torch.zeros(1, 3, 24, 24), 10).shape == (1, 3, 24, 24)


def test_resized_diffaug_resizes_around_the_denoiser(den16):
    from torchvision.transforms.v2.functional import resize

    from diffaug.augment import DiffAug, ResizedDiffAug, denoiser_at

    den = diffaug.load_denoiser(den16)
    den24, size = denoiser_at(den, 24)
    assert size is None and den24.image_size == (24, 24)  # runs at the crop size
    with pytest.raises(InputError, match="--denoiser-size"):
        denoiser_at(den, 15)
    den_n, size = denoiser_at(den, 15, 16)
    assert den_n is den and size == 16
    x = torch.rand(3, 3, 15, 15, generator=torch.Generator().manual_seed(1))
    aug = DiffAug(den, t_range=(50, 50))
    got = ResizedDiffAug(aug, 16)(x, generator=torch.Generator().manual_seed(2))
    ref = resize(aug(resize(x, [16, 16], antialias=True).clamp(0, 1), generator=torch.Generator().manual_seed(2)),
                 [15, 15], antialias=True).clamp(0, 1)
    assert got.shape == x.shape and torch.equal(got, ref)


def test_train_refuses_a_crop_the_denoiser_cannot_take_and_resizes_with_denoiser_size(tree, den16, tmp_path):
    from diffaug.train.classifier import TrainConfig, train_classifier

    base = dict(data=str(tree), recipe="diffaug", model="small_cnn", denoiser=str(den16), image_size=15, workers=0,
                steps=1, batch_size=6)
    with pytest.raises(InputError, match="--denoiser-size"):
        train_classifier(TrainConfig(**base), tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()
    train_classifier(TrainConfig(**base, denoiser_size=16), tmp_path / "b", progress=False)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["denoiser_size"] == 16


# ---------------------------------------------------------------------- aligned copies, extra data, sync-bn
def test_recipe_adds_one_cross_entropy_per_aligned_view():
    from diffaug.recipes import Plain

    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x, x1, x2 = (torch.rand(4, 3, 2, 2, generator=g) for _ in range(3))
    y = torch.tensor([0, 1, 2, 1])
    got, _ = Plain(model)(x, y, g, x_aligned=[x1, x2])
    want = sum(F.cross_entropy(model(v), y) for v in (x, x1, x2))
    torch.testing.assert_close(got, want)


def test_aligned_copies_share_the_crop_and_a_missing_copy_is_refused_before_training(tree, tmp_path):
    from diffaug.data import SeededView, aligned_copy, open_splits, train_transform
    from diffaug.train.classifier import TrainConfig, train_classifier

    copy = tmp_path / "edsr"
    shutil.copytree(tree / "train", copy / "train")
    train = open_splits(tree)["train"]
    view = SeededView(train, train_transform(12), seed=5, aligned=[aligned_copy(train, copy)])
    for key in ((0, 3), (2, 7)):
        crop, same, label = view[key]
        assert torch.equal(crop, same)  # identical copy, same random crop and flip
    cfg = TrainConfig(data=str(tree), recipe="plain", model="small_cnn", image_size=12, workers=0, steps=1,
                      batch_size=6, aligned=[str(copy)])
    train_classifier(cfg, tmp_path / "ok", progress=False)
    victim = sorted((copy / "train" / WNIDS[1]).iterdir())[0]
    victim.unlink()
    with pytest.raises(InputError, match=f"lacks train/{WNIDS[1]}/{victim.name}"):
        train_classifier(cfg, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_extra_data_is_added_by_class_name_and_sync_bn_is_a_noop_alone(tree, tmp_path, capsys):
    from diffaug.train.classifier import TrainConfig, train_classifier

    extra = tmp_path / "synth"
    shutil.copytree(tree / "val" / WNIDS[2], extra / WNIDS[2])  # one class only: matched by name, not position
    cfg = TrainConfig(data=str(tree), recipe="plain", model="small_cnn", image_size=12, workers=0, steps=1,
                      batch_size=6, extra_data=str(extra), sync_bn=True)
    train_classifier(cfg, tmp_path / "run", progress=True)
    out = capsys.readouterr().out
    assert "--sync-bn has no effect on one process" in out
    spec = json.loads((tmp_path / "run" / "model.json").read_text())
    n_train = sum(1 for p in (tree / "train").rglob("*") if p.is_file() and not p.name.startswith("."))
    assert spec["split_sizes"]["train"] == n_train + 2
    (extra / "n99999999").mkdir()
    shutil.copy(next((extra / WNIDS[2]).iterdir()), extra / "n99999999" / "x.JPEG")
    with pytest.raises(InputError, match="n99999999"):
        train_classifier(cfg, tmp_path / "bad", progress=False)


# ---------------------------------------------------------------------- timm transforms
def test_timm_transforms_are_seeded_per_sample_and_match_torchvision_at_eval(tree):
    from diffaug.data import SeededView, eval_transform, open_splits, train_transform

    train = open_splits(tree)["train"]
    state = random.getstate()
    a = SeededView(train, train_transform(20, "timm"), seed=1)
    x0, x1 = a[(0, 2)][0], a[(0, 2)][0]
    assert x0.shape == (3, 20, 20) and x0.dtype == torch.float32 and 0 <= x0.min() and x0.max() <= 1
    assert torch.equal(x0, x1) and not torch.equal(x0, a[(1, 2)][0])
    assert random.getstate() == state  # Python's RNG is left as it was
    img = train.read(4)[0]
    timm_eval, tv_eval = eval_transform(20, "timm")(img), eval_transform(20)(img)
    assert timm_eval.shape == tv_eval.shape == (3, 20, 20)
    # timm resizes to floor(20 / 0.875) = 22 with PIL, torchvision to round(22.86) = 23: the same centre view of
    # the image (its colour), not the same noisy pixels
    torch.testing.assert_close(timm_eval.mean((1, 2)), tv_eval.mean((1, 2)), rtol=0, atol=0.02)
    with pytest.raises(InputError, match="unknown transform library"):
        train_transform(20, "kornia")


# ---------------------------------------------------------------------- the study on a folder
def test_photo_patches_exist_at_any_size_and_small_ones_are_unchanged():
    from diffaug.data import photo_patches

    assert photo_patches(8, 1).shape == (120, 1, 8, 8)  # the digits' far-OOD set, as before
    for size in (54, 64, 224):
        p = photo_patches(size, 3)
        assert p.shape[0] >= 4 and p.shape[1:] == (3, size, size) and 0 <= p.min() and p.max() <= 1


def test_the_study_settings_reach_the_training_of_a_folder_of_large_images(tmp_path):
    """``study --data DIR``: the config's image size and a batch the folder can fill reach ``train``; the OOD stage's
    far-OOD photo patches exist at that size (test above; running eval-ood here costs a minute of CPU)."""
    import numpy as np
    from imagenet_tree import class_image
    from PIL import Image

    from diffaug.study.stages import StudyConfig, _folder_batch
    from diffaug.train.classifier import TrainConfig, train_classifier

    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / "folder" / f"c{c}").mkdir(parents=True)
        for i in range(6):
            Image.fromarray(class_image(rng, c, 56, 56)).save(tmp_path / "folder" / f"c{c}" / f"{i}.png")
    (tmp_path / "cfg.json").write_text(json.dumps({"data": str(tmp_path / "folder"), "image_size": 56}))
    cfg = StudyConfig.from_file(tmp_path / "cfg.json", quick=True)
    assert cfg.image_size == 56 and cfg.batch_size is None
    assert _folder_batch(cfg.data, None) == 12 and _folder_batch(cfg.data, [0, 1]) == 8  # 4 of 6 per class train
    train_classifier(TrainConfig(data=cfg.data, recipe="plain", model="small_cnn", steps=1, workers=0,
                                 image_size=cfg.image_size, batch_size=_folder_batch(cfg.data, None)),
                     tmp_path / "clf", progress=False)
    assert json.loads((tmp_path / "clf" / "model.json").read_text())["image_size"] == 56
