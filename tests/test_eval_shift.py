import csv

import numpy as np
import pytest
from PIL import Image

from diffaug.classifier import create_classifier, save_classifier
from diffaug.cli import main
from conftest import write_imagenet_c
from diffaug.data import corrupted_layout, load_corrupted


@pytest.fixture(scope="module")
def clfs(tmp_path_factory):
    """Two seeded untrained digit classifiers of one recipe (timing and plumbing do not need trained weights)."""
    root = tmp_path_factory.mktemp("shift")
    folders = []
    for seed in (0, 1):
        model = create_classifier("small_cnn", 10, 1, seed=seed)
        model.spec["recipe"] = "plain"
        save_classifier(model, root / f"plain-s{seed}")
        folders.append(str(root / f"plain-s{seed}"))
    return folders


def _rows(path):
    return list(csv.DictReader(open(path)))


@pytest.mark.slow
def test_eval_shift_cli_writes_table_csv_and_analyses(tmp_path, clfs):
    out = tmp_path / "o"
    args = ["eval-shift", "--classifier", *clfs, "--corruptions", "gaussian_noise,contrast", "--severities",
            "1,5", "--limit", "12", "--dda-steps", "4", "--batch", "8", "--out", str(out), "--quiet"]
    assert main(args) == 0
    rows = _rows(out / "results.csv")
    assert len(rows) == 2 * 4 * (1 + 2 * 2)  # classifiers x modes x (clean + corruptions x severities)
    assert all(0 <= float(r["accuracy"]) <= 1 and float(r["seconds_per_image"]) > 0 for r in rows)
    table = (out / "table.md").read_text()
    assert "| recipe (n classifiers) | DDA | DDA-SE | DE | Default | Avg |" in table
    assert "## Corrupted, severity 5" in table and "## Clean" in table and "| plain (2) |" in table
    for name in ("de_vs_t.png", "entropy_vs_t.png", "de_vs_t.csv", "entropy_vs_t.csv"):
        assert (out / name).stat().st_size > 0
    de = _rows(out / "de_vs_t.csv")
    assert {int(r["step"]) for r in de} == {25, 50, 75} and max(int(r["t_max"]) for r in de) == 450
    ent = _rows(out / "entropy_vs_t.csv")
    assert min(int(r["t"]) for r in ent) == 0 and max(int(r["t"]) for r in ent) == 999

    # keyed draws: a condition's numbers do not depend on which other conditions ran
    alone = tmp_path / "alone"
    assert main(["eval-shift", "--classifier", clfs[0], "--corruptions", "contrast", "--severities", "5",
                 "--limit", "12", "--dda-steps", "4", "--batch", "8", "--no-analyses", "--out", str(alone),
                 "--quiet"]) == 0
    key = ("contrast", "5", clfs[0])
    pick = {r["mode"]: r["accuracy"] for r in rows if (r["corruption"], r["severity"], r["classifier"]) ==
            ("contrast", "5", "plain-s0")}
    again = {r["mode"]: r["accuracy"] for r in _rows(alone / "results.csv") if r["corruption"] == key[0]}
    assert pick == again


def _cifar_c(root, n=4):
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in ("fog", "snow"):
        np.save(root / f"{name}.npy", rng.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8))
    np.save(root / "labels.npy", np.tile(np.arange(n) % 10, 5))
    return root




def test_corrupted_loaders(tmp_path):
    c = _cifar_c(tmp_path / "c10c")
    assert corrupted_layout(c) == "cifar10-c"
    ds = load_corrupted(c, "fog", 2)
    raw = np.load(c / "fog.npy")[4:8]
    assert ds.images.shape == (4, 3, 32, 32) and ds.classes[0] == "airplane"
    np.testing.assert_allclose(ds.images.permute(0, 2, 3, 1).numpy(), raw / 255, atol=1e-6)
    i = write_imagenet_c(tmp_path / "inc")
    assert corrupted_layout(i) == "imagenet-c"
    ds = load_corrupted(i, "fog", 5)
    assert ds.images.shape == (4, 1, 8, 8) and ds.classes == ["a", "b"] and ds.labels.tolist() == [0, 0, 1, 1]


def test_eval_shift_on_a_cifar10c_folder_without_a_denoiser(tmp_path):
    c = _cifar_c(tmp_path / "c10c")
    model = create_classifier("small_cnn", 10, 3, seed=0)
    save_classifier(model, tmp_path / "rgb")
    out = tmp_path / "o"
    assert main(["eval-shift", "--data", str(c), "--classifier", str(tmp_path / "rgb"), "--modes", "default",
                 "--no-analyses", "--denoiser", "", "--out", str(out), "--quiet"]) == 0
    rows = _rows(out / "results.csv")
    assert {(r["corruption"], r["severity"]) for r in rows} == {(n, str(s)) for n in ("fog", "snow")
                                                                 for s in range(1, 6)}


@pytest.mark.parametrize("extra, message", [
    (["--corruptions", "rain"], "unknown corruption rain"),
    (["--severities", "6"], "severity must lie in 1..5"),
    (["--modes", "default,tta"], "unknown mode tta"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--modes", "de", "--denoiser", ""], "need --denoiser"),
    (["--frost-images", "/no/such/folder"], "not a folder"),
])
def test_bad_arguments_fail_before_any_output(tmp_path, clfs, capsys, extra, message):
    out = tmp_path / "o"
    assert main(["eval-shift", "--classifier", clfs[0], "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_eval_shift_frost_from_a_photograph_folder(tmp_path, clfs):
    photos = tmp_path / "frost"
    photos.mkdir()
    Image.fromarray(np.full((60, 90, 4), (200, 210, 230, 128), np.uint8)).save(photos / "frost1.png")
    runs = {}
    for tag, extra in (("photo", ["--frost-images", str(photos)]), ("texture", [])):
        out = tmp_path / tag
        assert main(["eval-shift", "--classifier", clfs[0], "--corruptions", "frost", "--severities", "5",
                     "--modes", "default", "--limit", "8", "--no-analyses", "--out", str(out), "--quiet",
                     *extra]) == 0
        runs[tag] = (out / "table.md").read_text()
    assert f"Frost (corrupted on the fly) blends the photographs in {photos.resolve()}." in runs["photo"]
    assert "blends the procedural texture (no --frost-images)" in runs["texture"]


def test_mismatched_classifier_denoiser_and_layout_fail_early(tmp_path, clfs, capsys):
    rgb = create_classifier("small_cnn", 10, 3, seed=0)
    save_classifier(rgb, tmp_path / "rgb")
    assert main(["eval-shift", "--classifier", str(tmp_path / "rgb"), "--out", str(tmp_path / "o")]) == 2
    assert "3-channel" in capsys.readouterr().err
    five = create_classifier("small_cnn", 5, 1, seed=0)
    save_classifier(five, tmp_path / "five")
    assert main(["eval-shift", "--classifier", str(tmp_path / "five"), "--out", str(tmp_path / "o")]) == 2
    assert "5 classes" in capsys.readouterr().err
    c = _cifar_c(tmp_path / "c10c")
    assert main(["eval-shift", "--data", str(c), "--classifier", str(tmp_path / "rgb"), "--modes", "de",
                 "--no-analyses", "--out", str(tmp_path / "o")]) == 2
    assert "the denoiser takes 1-channel images but" in capsys.readouterr().err  # digits' is 8x8 gray, the data RGB
    broken = tmp_path / "broken"
    (broken / "fog").mkdir(parents=True)
    assert main(["eval-shift", "--data", str(broken), "--classifier", clfs[0], "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "neither CIFAR-10-C" in err and "ImageNet-C" in err and "found ['fog']" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_torchrun_shards_conditions_and_matches_one_process(tmp_path, clfs):
    import os
    import subprocess
    import sys

    args = ["eval-shift", "--classifier", clfs[0], "--modes", "default,de", "--corruptions", "fog,snow,contrast",
            "--severities", "5", "--limit", "10", "--no-analyses", "--quiet", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "diffaug.cli", *args, "--out", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0

    def acc(folder):
        return [(r["corruption"], r["mode"], r["accuracy"]) for r in _rows(folder / "results.csv")]

    assert acc(tmp_path / "ddp") == acc(tmp_path / "one") and len(acc(tmp_path / "one")) == 2 * 4
    assert not list((tmp_path / "ddp").glob("rows.rank*.json"))
