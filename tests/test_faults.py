"""Crash safety: SIGKILL at seeded points (halfway through a write, or right after one), then resume; a full disk.

``DIFFAUG_TEST_KILL_AT_WRITE=N`` (see ``diffaug/checkpoint.py``) makes a process kill itself with SIGKILL halfway
through its N-th write, ``N+`` right after it. Each command below is killed five times in a chain (every resumed
process is killed again), then finished; its results must equal an uninterrupted run's, and after every kill
every file a reader would open must be complete.
"""

import errno
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffaug import StorageError
from diffaug.utils.checkpoint import load_safetensors, read_jsonl, save_safetensors, write_json
from diffaug.cli import main

pytestmark = pytest.mark.slow


def _cli(args, kill_at=None, cwd=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("DIFFAUG_TEST_KILL_AT_WRITE", None)
    if kill_at is not None:
        env["DIFFAUG_TEST_KILL_AT_WRITE"] = kill_at
    return subprocess.run([sys.executable, "-m", "diffaug.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def _kill_points(seed: int, count: int = 5, most: int = 4) -> list[str]:
    """Seeded kill points: the k-th write of each (resumed) process, halfway through it or right after it."""
    rng = random.Random(seed)
    return [f"{rng.randint(1, most)}{rng.choice(['', '+'])}" for _ in range(count)]


def _assert_complete(folder: Path) -> None:
    """Every file a reader opens is whole: JSON parses, safetensors load, logs hold only whole rows."""
    for path in folder.rglob("*"):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue  # temporary files and folders: never read, swept by the next write
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            load_safetensors(path)
        elif path.suffix == ".jsonl":
            text = path.read_text()
            assert text == "" or text.endswith("\n") or len(read_jsonl(path)) == text.count("\n"), path


def _chain(args_first, args_resume, out: Path, seed: int, resumable=lambda out: True) -> list[str]:
    """Run, kill, resume, kill, ... (five kills), then finish; returns the kill points used. A run killed before
    its first checkpoint (``resumable(out)`` false) is started anew, as a user would."""
    points = _kill_points(seed)
    for point in points:
        done = _cli(args_resume if resumable(out) else args_first, kill_at=point)
        assert done.returncode == -signal.SIGKILL, (point, done.returncode, done.stderr[-2000:])
        _assert_complete(out)
    done = _cli(args_resume if resumable(out) else args_first)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_complete(out)
    return points


def _equal_tensors(a: Path, b: Path) -> None:
    ta, tb = load_safetensors(a)[0], load_safetensors(b)[0]
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), (a, b)


def test_train_diffusion_survives_sigkill(tmp_path):
    args = ["train-diffusion", "--steps", "12", "--batch-size", "16", "--width", "8", "--checkpoint-every", "1",
            "--quiet", "--device", "cpu", "--out"]
    assert _cli(args + [str(tmp_path / "ref")]).returncode == 0
    cut = tmp_path / "cut"
    _chain(args + [str(cut)], args + [str(cut), "--resume"], cut, seed=1,
           resumable=lambda out: (out / "checkpoint.safetensors").is_file())
    _equal_tensors(tmp_path / "ref" / "unet" / "diffusion_pytorch_model.safetensors",
                   cut / "unet" / "diffusion_pytorch_model.safetensors")
    ref_log = [r["step"] for r in read_jsonl(tmp_path / "ref" / "log.jsonl")]
    assert [r["step"] for r in read_jsonl(cut / "log.jsonl")] == ref_log


def test_train_survives_sigkill(tmp_path, den_dir):
    args = ["train", "--recipe", "diffaug", "--denoiser", str(den_dir), "--steps", "16", "--batch-size", "16",
            "--checkpoint-every", "1", "--quiet", "--device", "cpu", "--out"]
    assert _cli(args + [str(tmp_path / "ref")]).returncode == 0
    cut = tmp_path / "cut"
    _chain(args + [str(cut)], args + [str(cut), "--resume"], cut, seed=2,
           resumable=lambda out: any((out / "checkpoints").glob("step-*.safetensors")))
    _equal_tensors(tmp_path / "ref" / "model.safetensors", cut / "model.safetensors")
    steps = [r["step"] for r in read_jsonl(cut / "metrics.jsonl")]
    assert steps == [r["step"] for r in read_jsonl(tmp_path / "ref" / "metrics.jsonl")]


def test_certify_survives_sigkill(tmp_path, den_dir):
    from diffaug.classifier import create_classifier, save_classifier

    save_classifier(create_classifier("small_cnn", 10, 1, seed=0), tmp_path / "clf")
    args = ["certify", "--classifier", str(tmp_path / "clf"), "--denoiser", str(den_dir), "--sigma", "0.25",
            "--n0", "10", "--n", "50", "--batch", "50", "--limit", "10", "--quiet", "--out"]
    assert _cli(args + [str(tmp_path / "ref")]).returncode == 0
    cut = tmp_path / "cut"
    _chain(args + [str(cut)], args + [str(cut)], cut, seed=3)

    def rows(root):  # everything but the time column
        lines = (root / "clf" / "sigma_0.25" / "certify.tsv").read_text().splitlines()
        return [ln.split("\t")[:5] for ln in lines]

    assert rows(cut) == rows(tmp_path / "ref") and len(rows(cut)) == 11


def _numbers(results: dict) -> dict:
    """A study's results without wall-clock figures."""
    stages = {}
    for name, info in results["stages"].items():
        numbers = dict(info["numbers"] or {})
        numbers.pop("seconds_per_image", None)
        numbers.pop("dda_over_de", None)  # timings per condition
        stages[name] = numbers
    claims = [c for c in results["claims"] if "faster" not in c["claim"]]
    return {"stages": stages, "claims": claims}


def test_study_survives_sigkill(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"seeds": [0], "recipes": ["plain", "diffaug"], "epochs": 1, "shift_limit": 6,
                                  "shift_corruptions": "gaussian_noise", "shift_severities": "5",
                                  "certify_sigmas": [0.5], "certify_n0": 10, "certify_n": 20, "certify_limit": 3,
                                  "guidance_steps": 6, "guidance_per_class": 2, "guidance_sample_steps": 2,
                                  "semi_steps": 6, "toy_steps": 20}))
    args = ["study", "--config", str(config), "--quiet", "--out"]
    assert _cli(args + [str(tmp_path / "ref")]).returncode == 0
    cut = tmp_path / "cut"
    points = _chain(args + [str(cut)], args + [str(cut)], cut, seed=4)
    assert len(points) == 5
    ref = json.loads((tmp_path / "ref" / "results.json").read_text())
    got = json.loads((cut / "results.json").read_text())
    assert _numbers(got) == _numbers(ref)


def _disk_full_for(monkeypatch, name_part: str) -> None:
    """Make fsync fail with ENOSPC for files whose name contains ``name_part`` (the data never reaches disk)."""
    real_fsync = os.fsync

    def fsync(fd):
        if name_part in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name a file descriptor's file")
def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    path = tmp_path / "ckpt.safetensors"
    save_safetensors({"w": torch.ones(3)}, path, metadata={"step": 1})
    with monkeypatch.context() as m:
        _disk_full_for(m, "ckpt.safetensors")
        with pytest.raises(StorageError, match=r"no space left on the device while writing ckpt.safetensors .*intact"):
            save_safetensors({"w": torch.zeros(3)}, path, metadata={"step": 2})
    tensors, meta = load_safetensors(path)
    assert torch.equal(tensors["w"], torch.ones(3)) and meta["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]  # no temp file left behind

    # through the CLI: a run with a checkpoint at step 2 is continued to step 4 on a disk that is full
    out = tmp_path / "run"
    args = ["train-diffusion", "--batch-size", "8", "--width", "8", "--quiet", "--device", "cpu", "--out", str(out)]
    assert main(args + ["--steps", "2"]) == 0
    before = load_safetensors(out / "checkpoint.safetensors")
    with monkeypatch.context() as m:
        _disk_full_for(m, "checkpoint.safetensors")
        assert main(args + ["--steps", "4", "--resume"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no space left on the device while writing checkpoint" in err
    after = load_safetensors(out / "checkpoint.safetensors")
    assert after[1]["step"] == 2 and all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert main(args + ["--steps", "4", "--resume"]) == 0  # space freed: the run goes on
    assert load_safetensors(out / "checkpoint.safetensors")[1]["step"] == 4


def test_a_torn_log_line_is_skipped_and_rewound(tmp_path):
    from diffaug.utils.checkpoint import append_jsonl, rewind_jsonl

    log = tmp_path / "log.jsonl"
    append_jsonl(log, [{"step": 1}, {"step": 2}, {"step": 3}])
    with open(log, "a") as f:
        f.write('{"step": 4, "lo')  # what a kill halfway through an append leaves
    assert [r["step"] for r in read_jsonl(log)] == [1, 2, 3]
    rewind_jsonl(log, 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
    write_json(tmp_path / "x.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl", "x.json"]
