import json

import pytest
from PIL import Image

from diffaug.cli import main
from diffaug.denoiser import load_denoiser
from diffaug.evaluate.quality import measure_once
from conftest import tiny_denoiser


def test_show_augmentations_writes_the_grid(tmp_path):
    den = tiny_denoiser(conditional=True)
    den.save_pretrained(tmp_path / "den")
    assert main(["show-augmentations", "--denoiser", str(tmp_path / "den"), "--out", str(tmp_path / "a.png")]) == 0
    with Image.open(tmp_path / "a.png") as im:
        w, h = im.size
    assert w > 1.5 * h  # 4 rows, 9 columns (x0 + t = 350 ... 700)


def test_show_augmentations_on_the_shipped_default(tmp_path):
    assert main(["show-augmentations", "--denoiser", "digits", "--out", str(tmp_path / "a.png"), "--seed", "3"]) == 0
    assert (tmp_path / "a.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "argv, match",
    [
        (["show-augmentations", "--out", "x.jpg"], "--out must name a .png"),
        (["show-augmentations", "--denoiser", "nope", "--out", "x.png"], "unknown denoiser 'nope'"),
        (["show-augmentations", "--denoiser", "/no/such/dir", "--out", "x.png"], "does not exist"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, argv, match, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_shipped_default_quality_is_well_above_chance():
    """The shipped denoiser is judged by an independent classifier trained on the real digits."""
    row = measure_once(load_denoiser("digits"), seed=0, per_class=20, sample_steps=50, times=(300,))
    assert row["classifier_test_acc"] > 0.9
    assert row["sample_acc"] > 0.8  # chance is 0.1
    assert row["diffaug_t300_label_kept"] > 0.85  # measured 0.961 +- 0.006 over 3 seeds


def test_denoiser_quality_cli_writes_json(tmp_path, monkeypatch):
    import diffaug.evaluate.quality as q

    calls = []

    def fake_measure(den, seed, **kw):  # the CLI's aggregation, not the measurement, is under test here
        calls.append(seed)
        return {"seed": seed, "sample_acc": 0.5 + seed / 10}

    monkeypatch.setattr(q, "measure_once", fake_measure)
    tiny_denoiser().save_pretrained(tmp_path / "den")
    assert main(["denoiser-quality", "--denoiser", str(tmp_path / "den"), "--seeds", "0", "2",
                 "--out", str(tmp_path / "q.json")]) == 0
    result = json.loads((tmp_path / "q.json").read_text())
    assert calls == [0, 2]
    assert result["summary"]["sample_acc"]["mean"] == pytest.approx(0.6)
    assert result["summary"]["sample_acc"]["std"] == pytest.approx(0.1414, abs=1e-3)


def test_denoiser_quality_reads_a_folder_of_mixed_sizes_at_the_denoisers_size(tmp_path):
    from conftest import write_rgb_denoiser
    from imagenet_tree import make_tree

    from diffaug.evaluate.quality import quality_sets

    tree = make_tree(tmp_path / "tree", {"train": 4, "val": 2}, odd_files=False)  # JPEGs of 24-72 px, mixed
    den = load_denoiser(write_rgb_denoiser(tmp_path / "den", 16))
    train, test = quality_sets(str(tree), den)
    assert train.images.shape[1:] == (3, 16, 16) and test.images.shape[1:] == (3, 16, 16)
    assert len(train) == 4 * train.num_classes and len(test) == 2 * train.num_classes
    assert main(["denoiser-quality", "--denoiser", str(tmp_path / "den"), "--data", str(tree), "--seeds", "0",
                 "--out", str(tmp_path / "q.json")]) == 0
    per_seed = json.loads((tmp_path / "q.json").read_text())["per_seed"][0]
    assert {"classifier_test_acc", "diffaug_t100_label_kept"} <= set(per_seed)
