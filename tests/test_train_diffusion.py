import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffaug import InputError, load_denoiser
from diffaug.utils.checkpoint import load_safetensors
from diffaug.cli import main
from diffaug.data import load_dataset, load_digits
from diffaug.train.diffusion import DiffusionTrainConfig, train_diffusion


def tiny_cfg(**kw):
    base = dict(steps=8, batch_size=16, width=8, checkpoint_every=4, sample_steps=4, warmup_steps=2)
    base.update(kw)
    return DiffusionTrainConfig(**base)


def test_digits_split_is_fixed_and_disjoint():
    sizes = {s: len(load_digits(s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 1257, "val": 180, "test": 360}
    tr, te = load_digits("train"), load_digits("test")
    assert tr.images.min() >= 0 and tr.images.max() <= 1 and tr.images.shape[1:] == (1, 8, 8)
    assert torch.bincount(te.labels).min() >= 34  # stratified
    flat = {tuple(x.flatten().tolist()) for x in tr.images}
    assert sum(tuple(x.flatten().tolist()) in flat for x in te.images) < 5  # digits has a few exact duplicates


def test_train_writes_a_loadable_denoiser_and_resumes_exactly(tmp_path):
    straight = tmp_path / "straight"
    train_diffusion(tiny_cfg(), straight, progress=False)
    den = load_denoiser(straight)
    assert den.num_classes == 10 and den.null_class == 10
    for name in ("samples.png", "train_config.json", "log.jsonl", "checkpoint.safetensors"):
        assert (straight / name).is_file()
    assert len((straight / "log.jsonl").read_text().splitlines()) == 8

    split = tmp_path / "split"
    train_diffusion(tiny_cfg(steps=4), split, progress=False)
    train_diffusion(tiny_cfg(steps=8), split, resume=True, progress=False)
    a, meta_a = load_safetensors(straight / "checkpoint.safetensors")
    b, meta_b = load_safetensors(split / "checkpoint.safetensors")
    assert meta_a["step"] == meta_b["step"] == 8
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_denoiser(split).predict_x0(x, 10), den.predict_x0(x, 10))


def test_resume_and_overwrite_errors(tmp_path, capsys):
    train_diffusion(tiny_cfg(steps=2), tmp_path / "none", resume=True, progress=False)  # nothing to resume: starts
    assert "nothing to resume" in capsys.readouterr().err and (tmp_path / "none" / "diffaug.json").exists()
    train_diffusion(tiny_cfg(steps=4), tmp_path / "run", progress=False)
    with pytest.raises(InputError, match="is at step 4, beyond --steps 2"):
        train_diffusion(tiny_cfg(steps=2), tmp_path / "run", resume=True, progress=False)
    with pytest.raises(InputError, match="holds a finished run; pass --force"):
        train_diffusion(tiny_cfg(), tmp_path / "run", progress=False)
    with pytest.raises(InputError, match=r"differ from the run in .* \(lr\)"):
        train_diffusion(tiny_cfg(lr=1e-2), tmp_path / "run", resume=True, progress=False)
    with pytest.raises(InputError, match="label_dropout"):
        train_diffusion(tiny_cfg(label_dropout=1.0), tmp_path / "x", progress=False)


def test_checkpoint_from_before_a_setting_existed_resumes_with_its_default(tmp_path):
    from diffaug.utils.checkpoint import save_safetensors

    train_diffusion(tiny_cfg(steps=4), tmp_path / "run", progress=False)
    path = tmp_path / "run" / "checkpoint.safetensors"
    tensors, meta = load_safetensors(path)
    for key in ("precision", "channels_last", "compile"):  # as written by an older version
        del meta["config"][key]
    save_safetensors(tensors, path, metadata=meta)
    train_diffusion(tiny_cfg(steps=8), tmp_path / "run", resume=True, progress=False)
    with pytest.raises(InputError, match=r"differ from the run in .* \(precision\)"):
        train_diffusion(tiny_cfg(steps=8, precision="bf16"), tmp_path / "run", resume=True, progress=False)


def _write_folder(root, size=8, mode="L", n=6):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            shape = (size, size) if mode == "L" else (size, size, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / c / f"{i}.png")


def test_image_folder_training_and_errors(tmp_path):
    _write_folder(tmp_path / "data", mode="RGB")
    ds = load_dataset(tmp_path / "data")
    assert ds.images.shape == (12, 3, 8, 8) and ds.classes == ["cat", "dog"]
    train_diffusion(tiny_cfg(data=str(tmp_path / "data"), steps=2, batch_size=4, image_size=8, workers=0),
                    tmp_path / "run", progress=False)  # a folder is streamed (its train split), resized to 8 px
    den = load_denoiser(tmp_path / "run")
    assert den.channels == 3 and den.num_classes == 2
    assert json.loads((tmp_path / "run" / "diffaug.json").read_text())["classes"] == ["cat", "dog"]

    (tmp_path / "data" / "cat" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read image .*broken.png"):
        load_dataset(tmp_path / "data")
    (tmp_path / "data" / "cat" / "broken.png").unlink()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "data" / "dog" / "big.png")
    with pytest.raises(InputError, match="big.png has shape"):
        load_dataset(tmp_path / "data")
    with pytest.raises(InputError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no class sub-folders"):
        load_dataset(tmp_path / "empty")
    _write_folder(tmp_path / "odd", size=6)
    with pytest.raises(InputError, match="power-of-two.*--image-size"):
        train_diffusion(tiny_cfg(data=str(tmp_path / "odd"), image_size=6), tmp_path / "r2", progress=False)


def test_cli_train_diffusion_and_error_exit(tmp_path, capsys):
    assert main(["train-diffusion", "--out", str(tmp_path / "r"), "--steps", "2", "--width", "8",
                 "--batch-size", "8", "--quiet"]) == 0
    assert (tmp_path / "r" / "unet" / "config.json").is_file()
    assert main(["train-diffusion", "--out", str(tmp_path / "r"), "--steps", "2", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a finished run" in err[0]
