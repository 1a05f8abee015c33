"""Evaluations name classifiers (and OOD folders) by a unique short key: ``runs/a/s0`` and ``runs/b/s0`` no longer
collide (certify, eval-shift, eval-ood, pag share :func:`diffaug.evaluate.sets.folder_keys`)."""

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from diffaug import InputError
from diffaug.classifier import create_classifier
from diffaug.cli import main
from diffaug.evaluate.sets import folder_keys


def test_keys_are_the_folder_name_when_it_is_unique_and_longer_only_when_needed():
    assert folder_keys(["runs/plain-s0", "runs/diffaug-s0/", "x/plain-s1"]) == ["plain-s0", "diffaug-s0", "plain-s1"]
    assert folder_keys(["runs/a/s0", "runs/b/s0", "runs/b/s1"]) == ["a/s0", "b/s0", "s1"]
    assert folder_keys(["x/a/s0", "y/a/s0", "z/b/s0"]) == ["x/a/s0", "y/a/s0", "b/s0"]
    here = Path.cwd().parts[1:]
    inner = os.path.join(*here[-1:], "s0")  # cwd/../<cwd name>/s0 is the same folder as s0
    with pytest.raises(InputError, match="given twice"):
        folder_keys(["s0", os.path.join("..", inner)])
    with pytest.raises(InputError, match=r"OOD set folder ./x/ is given twice \(x is the same folder\)"):
        folder_keys(["x", "./x/"], what="OOD set")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from("abc"), min_size=1, max_size=4), min_size=1, max_size=6, unique_by=tuple))
def test_keys_are_distinct_relative_suffixes(paths):
    folders = [os.path.join(*p) for p in paths]
    keys = folder_keys(folders)
    assert len(set(keys)) == len(keys)
    for folder, key in zip(folders, keys):
        assert not os.path.isabs(key) and os.path.abspath(folder).endswith(os.sep + key.replace("/", os.sep))
        if sum(Path(f).name == Path(folder).name for f in folders) == 1:
            assert key == Path(folder).name  # what certify and eval-shift used before: unchanged tables


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """Two digit classifiers of one recipe, both in a folder named s0."""
    root = tmp_path_factory.mktemp("twins")
    for run, seed in (("a", 0), ("b", 1)):
        create_classifier("small_cnn", 10, 1, seed=seed, width=8).save_pretrained(
            root / run / "s0", extra={"recipe": "plain"})
    return [str(root / "a" / "s0"), str(root / "b" / "s0")]


def test_certify_keeps_both_classifiers_named_s0(tmp_path, twins):
    assert main(["certify", "--classifier", *twins, "--sigma", "0.5", "--n0", "5", "--n", "20", "--batch", "20",
                 "--limit", "2", "--out", str(tmp_path), "--quiet", "--device", "cpu"]) == 0
    for key in ("a/s0", "b/s0"):
        assert len((tmp_path / key / "sigma_0.5" / "certify.tsv").read_text().splitlines()) == 3
        assert f"| {key} | best |" in (tmp_path / "table.md").read_text()


def test_eval_shift_keeps_both_and_refuses_a_repeat(tmp_path, twins, capsys):
    args = ["eval-shift", "--modes", "default", "--corruptions", "fog", "--severities", "1", "--limit", "3",
            "--no-analyses", "--quiet", "--device", "cpu"]
    assert main([*args, "--classifier", *twins, "--out", str(tmp_path / "o")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "o" / "results.csv")))
    assert {r["classifier"] for r in rows} == {"a/s0", "b/s0"}
    assert main([*args, "--classifier", twins[0], twins[0] + "/", "--out", str(tmp_path / "r")]) == 2
    assert "given twice" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_eval_ood_keeps_two_ood_folders_of_one_name(tmp_path, twins):
    from diffaug.evaluate.ood import run_eval_ood

    gen = np.random.default_rng(0)
    for run in ("a", "b"):
        (tmp_path / run / "images" / "x").mkdir(parents=True)
        for i in range(4):
            pixels = gen.integers(0, 256, (8, 8), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / run / "images" / "x" / f"{i}.png")
    res = run_eval_ood(data="digits", classifiers=twins[:1], ood=[str(tmp_path / "a" / "images"),
                                                                   f"near={tmp_path / 'b' / 'images'}"],
                       seed=0, out=tmp_path / "o", device=torch.device("cpu"))
    rows = list(csv.DictReader(open(tmp_path / "o" / "results.csv")))
    assert {(r["set"], r["group"]) for r in rows} == {("a/images", "far"), ("b/images", "near")}
    # the returned rows are the file's, unparsed; the returned text is table.md
    assert [{k: "" if v is None else str(v) for k, v in r.items()} for r in res.rows] == rows  # csv: None -> ""
    assert res.text == (tmp_path / "o" / "table.md").read_text()
    with pytest.raises(InputError, match="given twice"):
        run_eval_ood(data="digits", classifiers=[twins[0], twins[0]], ood=["noise"], seed=0, out=tmp_path / "r")
