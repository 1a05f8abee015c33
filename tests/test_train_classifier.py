import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from diffaug import InputError, load_classifier
from diffaug.augment import DiffAug
from diffaug.classifier import create_classifier, save_classifier
from diffaug.cli import main
from diffaug.utils.checkpoint import load_safetensors
from diffaug.recipes import DiffAugRecipe
from diffaug.train.classifier import RECIPES, TrainConfig, train_classifier
from conftest import tiny_denoiser


def cfg(den_dir, **kw):
    base = dict(recipe="diffaug", denoiser=str(den_dir), steps=4, batch_size=32, checkpoint_every=2)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_recipe_trains_and_exports(tmp_path, den_dir, recipe):
    model = train_classifier(cfg(den_dir, recipe=recipe), tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "model.json").read_text())
    assert saved["recipe"] == recipe and 0 <= saved["test_acc"] <= 1
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"] == "small_cnn"
    again = load_classifier(tmp_path / "run")
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows[:4]] == [1, 2, 3, 4] and "test_acc" in rows[-1]
    assert len(list((tmp_path / "run" / "checkpoints").iterdir())) == 2


def test_training_actually_learns(tmp_path, den_dir):
    train_classifier(cfg(den_dir, recipe="plain", steps=60, lr=3e-3), tmp_path / "run", progress=False)
    assert json.loads((tmp_path / "run" / "model.json").read_text())["test_acc"] > 0.8


def test_diffaug_loss_is_clean_plus_diffaug_ce(den_dir):
    from diffaug.denoiser import load_denoiser

    den = load_denoiser(den_dir)
    model = create_classifier("small_cnn", 10, 1, seed=0).eval()
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8)
    aug = DiffAug(den)
    loss, logits = DiffAugRecipe(model, aug, weight=0.5, fraction=0.5)(x, y, torch.Generator().manual_seed(0))
    assert logits.shape == (12, 10)
    x_da = aug(x[:4], generator=torch.Generator().manual_seed(0))
    ref = F.cross_entropy(model(x), y) + 0.5 * F.cross_entropy(model(x_da), y[:4])
    torch.testing.assert_close(loss, ref)


def _run_cli(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "diffaug.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _weights(path):
    return load_safetensors(path / "model.safetensors")[0]


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_run_resumes_bitwise_equal(tmp_path, den_dir, how):
    args = ["train", "--recipe", "augmix+diffaug", "--denoiser", str(den_dir), "--steps", "24",
            "--batch-size", "16", "--checkpoint-every", "3", "--quiet", "--device", "cpu"]
    ref = _run_cli(args + ["--out", str(tmp_path / "ref")])
    victim = _run_cli(args + ["--out", str(tmp_path / "cut")])
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "cut" / "checkpoints").glob("step-0000000[6-9]*")):
        time.sleep(0.05)
    victim.send_signal(how)
    out = victim.communicate(timeout=120)[0]
    assert ref.wait(timeout=300) == 0
    assert not (tmp_path / "cut" / "model.safetensors").exists(), "the run finished before it was interrupted"
    if how == signal.SIGTERM:
        assert victim.returncode == 128 + signal.SIGTERM and "checkpoint saved" in out
    resumed = _run_cli(args + ["--out", str(tmp_path / "cut"), "--resume"])
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(r)["step"] for r in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps[:-1] == list(range(1, 25))


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tmp_path, den_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "diffaug.cli", "train", "--recipe", "diffaug", "--denoiser", str(den_dir), "--steps", "6",
           "--batch-size", "32", "--checkpoint-every", "3", "--out", str(tmp_path / "ddp"), "--quiet",
           "--device", "cpu"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Grad strides do not match" not in done.stderr
    tensors, meta = load_safetensors(tmp_path / "ddp" / "checkpoints" / "step-00000006.safetensors")
    assert meta["world"] == 2 and "rng.rank1" in tensors
    assert not torch.equal(tensors["rng.rank0"], tensors["rng.rank1"])  # per-rank DiffAug noise
    rows = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 7  # rank 0 logs alone: 6 steps + the final evaluation
    assert load_classifier(tmp_path / "ddp").spec["recipe"] == "diffaug"


def test_fine_tune_from_pretrained(tmp_path, den_dir):
    base = create_classifier("small_cnn", 10, 1, seed=3)
    save_classifier(base, tmp_path / "base")
    torch.save(base.state_dict(), tmp_path / "base.pt")
    for src in (tmp_path / "base" / "model.safetensors", tmp_path / "base.pt"):
        c = cfg(den_dir, recipe="plain", pretrained=str(src), steps=1, lr=1e-9, warmup_steps=0)
        model = train_classifier(c, tmp_path / f"ft-{src.suffix}", progress=False)
        w = model.state_dict()["features.0.weight"]
        torch.testing.assert_close(w, base.state_dict()["features.0.weight"], atol=1e-6, rtol=0)


def test_errors_before_any_output(tmp_path, den_dir, capsys):
    wrong = tmp_path / "wrong"
    tiny_denoiser(channels=3).save_pretrained(wrong)
    bad = tmp_path / "bad.pt"

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"x": Evil()}, bad)
    cases = [
        (cfg(den_dir, recipe="mixup"), r"unknown recipe .mixup.; use one of plain, diffaug, augmix, augmix\+diffaug"),
        (cfg(den_dir, model="no_such_net_xyz"), "unknown model 'no_such_net_xyz'"),
        (cfg(den_dir, data=str(tmp_path / "nowhere")), "does not exist"),
        (cfg(wrong), "has 1 channels but the denoiser was built for 3"),
        (cfg(den_dir, recipe="plain", pretrained=str(bad)), "not a plain state dict"),
        (cfg(den_dir, model="resnet_small", recipe="plain",
             pretrained=str(tmp_path / "nope.safetensors")), "does not exist"),
        (cfg(den_dir, steps=None), "exactly one of --steps or --epochs"),
        (cfg(den_dir, diffaug_fraction=0), "diffaug_fraction"),
    ]
    for c, match in cases:
        with pytest.raises(InputError, match=match):
            train_classifier(c, tmp_path / "out", progress=False)
        assert not (tmp_path / "out").exists()
    train_classifier(cfg(den_dir, recipe="plain", steps=2), tmp_path / "done", progress=False)
    with pytest.raises(InputError, match="finished run; pass --force"):
        train_classifier(cfg(den_dir, recipe="plain", steps=2), tmp_path / "done", progress=False)
    with pytest.raises(InputError, match=r"differ from the run in .* \(lr\)"):
        train_classifier(cfg(den_dir, recipe="plain", steps=4, lr=1.0), tmp_path / "done", resume=True,
                         progress=False)
    train_classifier(cfg(den_dir, recipe="plain", steps=2), tmp_path / "done", force=True, progress=False)
    assert main(["train", "--recipe", "nope", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown recipe 'nope'" in err[0]


DDP_LAYOUT_SCRIPT = """
import sys, torch, torch.distributed as dist
from torch import nn
from diffaug.utils.distributed import data_parallel, exit_process, init_distributed
init_distributed(torch.device("cpu"))
conv = nn.Conv2d(1, 4, 3)
# a [4, 1, 3, 3] weight whose size-1 dim has another stride than the kernel's gradient gives it (what oneDNN does
# to a 1-channel first convolution on some CPUs, made explicit here so it happens on every CPU)
conv.weight = nn.Parameter(conv.weight.detach().clone().as_strided((4, 1, 3, 3), (9, 7, 3, 1)))
model = nn.Sequential(conv, nn.Flatten(), nn.LazyLinear(2))
model(torch.zeros(1, 1, 6, 6))
fixed = sys.argv[1] == "fixed"
net = data_parallel(model, torch.device("cpu")) if fixed else nn.parallel.DistributedDataParallel(model)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
g = torch.Generator().manual_seed(dist.get_rank())
for _ in range(3):
    opt.zero_grad(set_to_none=not fixed)
    net(torch.randn(8, 1, 6, 6, generator=g)).sum().backward()
    opt.step()
w = [torch.zeros_like(conv.weight) for _ in range(2)]
dist.all_gather(w, conv.weight.detach().contiguous())
assert torch.equal(w[0], w[1])  # the ranks stayed in step
exit_process(0)
"""


@pytest.mark.slow
def test_ddp_gradients_are_laid_out_as_the_buckets(tmp_path):
    """DDP warns "Grad strides do not match bucket view strides" (and copies every gradient) when autograd's
    gradient has another layout than the parameter's bucket view; data_parallel makes gradients the bucket views."""
    script = tmp_path / "ddp_layout.py"
    script.write_text(DDP_LAYOUT_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    stderr = {}
    for mode in ("plain", "fixed"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               mode]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        stderr[mode] = done.stderr
    assert "Grad strides do not match" in stderr["plain"]  # the layout problem is real on this CPU
    assert "Grad strides do not match" not in stderr["fixed"]
