"""train-diffusion and train-guidance under torchrun (two CPU processes, gloo)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffaug import load_denoiser
from diffaug.cli import main
from diffaug.errors import InputError
from diffaug.guidance import GuidanceClassifier
from diffaug.utils.checkpoint import load_safetensors
from diffaug.utils.distributed import Dist, local_device, rank_share

PLAN = Path(__file__).with_name("torchrun_plan.py")


def _diffusion(out, steps, *more):
    return ["train-diffusion", "--out", str(out), "--steps", str(steps), "--width", "8", "--batch-size", "8",
            "--checkpoint-every", "2", "--no-sample-grid", "--quiet", "--device", "cpu", *more]


def _guidance(out, den_dir, *more):
    return ["train-guidance", "--denoiser", str(den_dir), "--out", str(out), "--steps", "2", "--batch-size", "8",
            "--width", "8", "--quiet", "--device", "cpu", *more]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [8, 12])
def test_rank_shares_cover_the_global_batch_once_in_order(world, n):
    indices = torch.randperm(50, generator=torch.Generator().manual_seed(n))[:n]
    shares = [rank_share(indices, Dist(r, world)) for r in range(world)]
    assert torch.equal(torch.cat(shares), indices)  # each global index exactly once: one process's batch
    if n % world == 0:
        assert {len(s) for s in shares} == {n // world}
    assert rank_share(indices, Dist()) is indices


def test_under_torchrun_each_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    """torchrun --nproc_per_node K: a bare ``cuda`` is ``cuda:LOCAL_RANK`` and made current (no GPU needed here:
    torch.cuda's device count and set_device are stood in for)."""
    current = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert local_device("cuda") == torch.device("cuda") and not current  # alone: as given
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert local_device("cpu") == torch.device("cpu") and not current
    assert local_device("cuda") == torch.device("cuda", 1) and current == [torch.device("cuda", 1)]
    assert local_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is kept
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(InputError, match=r"local rank 2 .* 2 CUDA device\(s\); use --nproc_per_node 2 or fewer"):
        local_device("cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # each process sees its own GPU only (SLURM)
    assert local_device("cuda") == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(InputError, match="sees no CUDA device; use --device cpu"):
        local_device("cuda")


def _one_rank_env() -> dict:
    """The environment torchrun gives a one-rank group, on a free port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                OMP_NUM_THREADS="1")


_LEAVE_AT_EXIT = """
import atexit, sys
import torch, torch.distributed as dist
from diffaug.utils import distributed
atexit.register(lambda: print("initialized at exit:", dist.is_initialized()))  # runs after the handlers of later
distributed.world_size = lambda: 2  # a one-rank group, joined as under torchrun                  # registrations
info = distributed.init_distributed(torch.device("cpu"))
distributed.init_distributed(torch.device("cpu"))  # joining twice registers nothing more
print("rank", info.rank, "world", info.world, "initialized:", dist.is_initialized())
"""


def test_a_joined_process_group_is_left_at_exit(tmp_path):
    # init_distributed leaves the group it joined at exit (exit_process runs the exit handlers before os._exit).
    env = _one_rank_env()
    done = subprocess.run([sys.executable, "-c", _LEAVE_AT_EXIT], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["rank 0 world 1 initialized: True", "initialized at exit: False"]


_EXIT_PROCESS = """
import atexit, sys, threading, time
import torch
from diffaug.utils import distributed


class Teardown:
    def __del__(self):
        print("teardown ran")  # runs when the interpreter's teardown clears this module


keep = Teardown()
atexit.register(lambda: print("exit handlers ran; group up:", torch.distributed.is_initialized()))
if sys.argv[1] == "joined":
    distributed.world_size = lambda: 2  # a one-rank group, joined as under torchrun
    distributed.init_distributed(torch.device("cpu"))
threading.Thread(target=lambda: (time.sleep(0.2), print("thread done"))).start()  # not a daemon: joined first
print("buffered", end=" ")  # neither a newline nor a flush: must still reach the pipe
distributed.exit_process(3)
"""


@pytest.mark.parametrize("mode", ["joined", "alone"])
def test_a_process_that_joined_a_group_ends_without_the_teardown(tmp_path, mode):
    # Under load a gloo worker thread can release a finished collective's tensors after Python's teardown has
    # begun, and the rank aborts (SIGABRT) after its work is done: the failure two CI runs hit. exit_process ends
    # a rank that joined a group as the teardown would begin (threads joined, exit handlers run, streams flushed),
    # then with os._exit; a process that joined none exits normally.
    env = _one_rank_env()
    done = subprocess.run([sys.executable, "-c", _EXIT_PROCESS, mode], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]
    lines = ["buffered thread done", "exit handlers ran; group up: False"]
    assert done.stdout.splitlines() == (lines if mode == "joined" else [*lines, "teardown ran"]), done.stderr


@pytest.mark.slow
def test_two_processes_train_resume_exactly_and_match_the_one_process_gradient(tmp_path, den_dir, capsys):
    ddp = tmp_path / "ddp"
    plan = {"commands": [_diffusion(ddp / "straight", 4),
                         _diffusion(ddp / "split", 2),
                         _diffusion(ddp / "split", 4, "--resume"),
                         _guidance(ddp / "da", den_dir, "--kind", "da")],
            "grad_check": str(tmp_path / "grads.safetensors"),
            "sync_check": {"out": str(ddp / "semi"), "denoiser": str(den_dir), "result": str(tmp_path / "sync.json")}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",  # a free port
           str(PLAN), str(tmp_path / "plan.json")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Grad strides do not match" not in done.stderr

    # the checkpoint: two ranks, two different generators; rank 0 alone logs
    tensors, meta = load_safetensors(ddp / "straight" / "checkpoint.safetensors")
    assert meta["world"] == 2 and meta["step"] == 4
    assert not torch.equal(tensors["rng.rank0"], tensors["rng.rank1"])
    assert [json.loads(r)["step"] for r in (ddp / "straight" / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    den = load_denoiser(ddp / "straight")
    assert den.num_classes == 10

    # stopped at step 2 and resumed on two ranks: bitwise the straight run
    resumed, _ = load_safetensors(ddp / "split" / "checkpoint.safetensors")
    assert resumed.keys() == tensors.keys() and all(torch.equal(resumed[k], tensors[k]) for k in tensors)
    assert (ddp / "split" / "log.jsonl").read_text() == (ddp / "straight" / "log.jsonl").read_text()

    # guidance: the outputs of a DA run (frozen denoiser outside DDP) and a semi-supervised one (two forwards of
    # the network per step), whose ranks, drawing different noise, end with equal weights
    for name in ("da", "semi"):
        assert json.loads((ddp / name / "metrics.json").read_text())["accuracy"] >= 0
        assert load_safetensors(ddp / name / "checkpoint.safetensors")[1]["world"] == 2
    assert GuidanceClassifier.from_pretrained(ddp / "da", load_denoiser(den_dir)).kind == "da"
    assert json.loads((tmp_path / "sync.json").read_text()) == {"world": 2, "equal": True}

    # the averaged DDP gradient of the two shares is the one-process gradient of the whole batch
    g, _ = load_safetensors(tmp_path / "grads.safetensors")
    names = [k[len("full."):] for k in g if k.startswith("full.")]
    full = torch.cat([g[f"full.{k}"].flatten() for k in names])
    ddp_grad = torch.cat([g[f"ddp.{k}"].flatten() for k in names])
    local = torch.cat([g[f"local.{k}"].flatten() for k in names])
    scale = full.abs().max()
    torch.testing.assert_close(ddp_grad, full, rtol=1e-4, atol=1e-5 * scale)
    assert (local - full).abs().max() > 1e-2 * scale  # one share's gradient is not the batch's: the check can fail

    # a resume with another number of processes is refused in one line
    assert main(_diffusion(ddp / "split", 6, "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert "used 2 processes; resume with the same number" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    (lambda out, den: _diffusion(out, 2, "--batch-size", "7"), "batch size 7 is not divisible by 2 ranks"),
    (lambda out, den: _guidance(out, den, "--kind", "noisy", "--batch-size", "9"),
     "batch size 9 is not divisible by 2 ranks"),
    (lambda out, den: _guidance(out, den, "--kind", "noisy", "--labelled-fraction", "0.001",
                                       "--batch-size", "12"),
     "the 10 labelled images .* do not split evenly over 4 ranks"),
])
def test_a_batch_the_ranks_cannot_share_is_refused_before_any_work(tmp_path, den_dir, capsys, monkeypatch, argv,
                                                                   message):
    world = "4" if "labelled" in message else "2"
    monkeypatch.setenv("WORLD_SIZE", world)  # as torchrun sets it; the check comes before joining any group
    out = tmp_path / "out"
    assert main(argv(out, den_dir)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert not out.exists()


def test_with_net_keeps_the_math_and_settings(den_dir, images):
    from diffaug.guidance import build_guidance

    den = load_denoiser(den_dir)
    den.precision, den.channels_last = "bf16", True
    calls = []

    class Spy(torch.nn.Module):  # stands in for DDP's wrapper: the same calling convention
        def __init__(self, net):
            super().__init__()
            self.module = net

        def forward(self, *args):
            calls.append(len(args))
            return self.module(*args)

    wrapped = den.with_net(Spy(den.net))
    assert (wrapped.precision, wrapped.channels_last, wrapped.num_classes, wrapped.null_class,
            wrapped.image_size) == ("bf16", True, den.num_classes, den.null_class, den.image_size)
    den.precision = wrapped.precision = "fp32"
    x, t = den.encode(images), torch.arange(6) * 100
    with torch.no_grad():
        assert torch.equal(wrapped.predict_x0(x, t), den.predict_x0(x, t)) and calls == [3]
        model = build_guidance("da", den, 10, width=8)
        spied = model.with_net(Spy(model.net))
        assert spied.kind == "da" and spied.denoiser is den
        assert torch.equal(spied(x, t), model(x, t)) and calls == [3, 2]


_LAUNCHER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
print(child.pid, flush=True)
time.sleep(120)
"""

_RANK = """
import os, signal, sys, time
os.environ["LOCAL_RANK"] = "0"  # as torchrun sets it
from diffaug.utils import distributed
signal.signal(signal.SIGTERM, lambda *a: (open(sys.argv[1], "w").write("stopped"), sys.exit(0)))
distributed.follow_launcher(interval=0.05)
distributed.follow_launcher(interval=0.05)  # a second call starts no second watcher
open(sys.argv[1] + ".ready", "w").write("watching")
time.sleep(60)
"""


def test_a_rank_stops_when_its_launcher_is_killed(tmp_path):
    # torchrun forwards SIGTERM/SIGINT to its ranks, but a SIGKILLed launcher leaves them running and writing the
    # run folder; follow_launcher sends the orphan SIGTERM (a training loop saves and exits on it).
    import signal
    import time

    flag = tmp_path / "stopped"
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, _RANK, str(flag)], stdout=subprocess.PIPE,
                                text=True)
    rank = int(launcher.stdout.readline())
    try:
        deadline = time.monotonic() + 120
        while not flag.with_suffix(".ready").exists() and time.monotonic() < deadline:  # the rank imports torch
            time.sleep(0.1)
        time.sleep(0.5)  # watching: it must not stop while its launcher lives
        assert flag.with_suffix(".ready").exists() and not flag.exists()
        launcher.kill()
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 60
        while not flag.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert flag.read_text() == "stopped"
    finally:
        launcher.kill()
        try:
            os.kill(rank, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_until_released(out, seconds: float) -> None:
    """Wait until no process holds the run folder ``out`` (its ranks ended); fail after ``seconds``."""
    import time

    from diffaug.utils.locking import exclusive

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with exclusive(out):
                return
        except InputError:
            time.sleep(0.2)
    pytest.fail(f"the ranks still hold the run folder {seconds} s after their launcher was killed")


@pytest.mark.slow
def test_killing_the_torchrun_launcher_stops_its_ranks_with_a_checkpoint(tmp_path):
    """SIGKILL to torchrun itself (not to its ranks): the two ranks save at a step boundary and exit, releasing the
    run folder, and --resume continues the run's log without a gap."""
    import signal
    import time

    out = tmp_path / "run"
    argv = _diffusion(out, 10_000)
    script = "import sys; from diffaug.cli import main; sys.exit(main(sys.argv[1:]))"
    (tmp_path / "run_cli.py").write_text(script)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    log = open(tmp_path / "torchrun.log", "w")
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", str(tmp_path / "run_cli.py"), *argv], env=env, stdout=log, stderr=log,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint.safetensors").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (out / "checkpoint.safetensors").exists(), (tmp_path / "torchrun.log").read_text()[-3000:]
        launcher.kill()  # the launcher alone: its ranks are not signalled
        launcher.wait(timeout=30)
        _wait_until_released(out, 120)  # the ranks release the run folder when they end
        printed = (tmp_path / "torchrun.log").read_text()
        assert re.search(r"rank [01]: the torchrun launcher is gone: stopping this run", printed)
        step = load_safetensors(out / "checkpoint.safetensors")[1]["step"]
        assert 2 <= step < 10_000
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)  # the ranks, if the test failed (they share the launcher's group)
        except ProcessLookupError:
            pass
        log.close()
    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              str(tmp_path / "run_cli.py"), *_diffusion(out, step + 2, "--resume")], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [json.loads(r)["step"] for r in (out / "log.jsonl").read_text().splitlines()] == list(range(1, step + 3))


@pytest.mark.slow
def test_ranks_whose_launcher_dies_before_they_meet_end_and_release_the_folder(tmp_path):
    """SIGKILL to torchrun while its ranks start (rank 0 holds the run folder, the group is not joined): they used
    to wait 30 minutes for the dead launcher's rendezvous, then retry, holding OUT/.lock; now they end in seconds."""
    import signal
    import time

    out = tmp_path / "run"
    (tmp_path / "run_cli.py").write_text("import sys; from diffaug.cli import main; sys.exit(main(sys.argv[1:]))")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", str(tmp_path / "run_cli.py"), *_diffusion(out, 10_000)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / ".lock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        launcher.kill()
        launcher.wait(timeout=30)
        _wait_until_released(out, 90)
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_rank_errors_are_said_once_and_a_peer_failure_in_one_line(monkeypatch):
    """Under torchrun an error every rank meets before the ranks join (settings, files) is printed by rank 0 alone
    (and by the first rank of other nodes, whose files may differ); one met later by its rank, with the rank; a
    collective broken by another rank's exit is one line, not a gloo traceback."""
    from diffaug import cli
    from diffaug.utils import distributed

    monkeypatch.setattr(distributed, "_joined", False)
    for rank, local, joined, expected in [("0", "0", False, "diffaug train: error: x"),
                                          ("1", "1", False, None),
                                          ("8", "0", False, "diffaug train (rank 8): error: x"),
                                          ("1", "1", True, "diffaug train (rank 1): error: x")]:
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", local)
        monkeypatch.setattr(distributed, "_joined", joined)
        assert cli._error_line("train", "error: x") == expected
    assert cli._error_line("certify", "interrupted", rank_local=False) is None  # rank 1 of 2, joined
    assert cli._peer_failed(RuntimeError("[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [::1]:1"))
    assert not cli._peer_failed(RuntimeError("CUDA out of memory"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert cli._error_line("train", "error: x") == "diffaug train: error: x"
    assert not cli._peer_failed(RuntimeError("Connection closed by peer"))  # alone: nothing to blame


@pytest.mark.slow
def test_under_torchrun_unsharded_commands_are_refused_and_a_bad_file_stops_every_rank_in_a_few_lines(tmp_path):
    import numpy as np
    from PIL import Image

    (tmp_path / "run_cli.py").write_text("import sys; from diffaug.cli import main; sys.exit(main(sys.argv[1:]))")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")

    def torchrun(*argv):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(tmp_path / "run_cli.py"), *argv], env=env, capture_output=True, text=True,
                              timeout=300)

    done = torchrun("eval-ood", "--classifier", str(tmp_path / "none"), "--out", str(tmp_path / "o"))
    said = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.startswith("diffaug")]
    assert done.returncode != 0 and said == [
        "diffaug eval-ood: error: eval-ood does not run under torchrun (it is not sharded: every process would do the "
        "whole job); run it as one process (torchrun runs train-diffusion, train, train-guidance, certify, eval-shift)"]
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "data" / c / f"{i}.png")
    (tmp_path / "data" / "a" / "5.png").write_bytes(b"not an image")
    done = torchrun("train", "--data", str(tmp_path / "data"), "--recipe", "plain", "--model", "small_cnn",
                    "--image-size", "16", "--batch-size", "8", "--workers", "0", "--steps", "40", "--quiet",
                    "--device", "cpu", "--out", str(tmp_path / "t"))
    printed = done.stdout + done.stderr
    assert done.returncode != 0 and "cannot read image" in printed and "5.png" in printed
    # the other rank, blocked in the step's all-reduce, says so in one line (unless torchrun ended it first)
    assert "Connection closed by peer" not in printed and "[rank1]: Traceback" not in printed


def test_sharded_evaluations_let_a_fast_rank_wait_for_the_slowest(monkeypatch, tmp_path):
    """certify and eval-shift meet only in a barrier after each rank's share; shares of unequal cost (sequential
    certification, say) must not hit PyTorch's default collective timeout (30 min gloo, 10 min NCCL)."""
    import datetime

    import torch.distributed as dist

    from diffaug.classifier import create_classifier, save_classifier
    from diffaug.utils import distributed

    joined = {}
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: joined.update(backend=backend, **kw))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed.atexit, "register", lambda f: None)
    monkeypatch.setattr(distributed, "_joined", False)
    day = datetime.timedelta(days=1)
    assert distributed.init_distributed(torch.device("cpu"), day) == Dist(0, 2)
    assert joined == {"backend": "gloo", "timeout": day}

    class Joined(Exception):
        pass

    def stop_at_join(device, timeout=None):
        raise Joined(timeout)

    monkeypatch.setattr(distributed, "init_distributed", stop_at_join)
    save_classifier(create_classifier("small_cnn", 10, 1, seed=0), tmp_path / "clf")
    for argv in (["certify", "--sigma", "0.25", "--n0", "2", "--n", "4", "--limit", "1"],
                 ["eval-shift", "--modes", "default", "--corruptions", "fog", "--severities", "1", "--limit", "2",
                  "--no-analyses"]):
        with pytest.raises(Joined) as e:
            main([*argv, "--classifier", str(tmp_path / "clf"), "--out", str(tmp_path / argv[0])])
        assert e.value.args[0] == distributed.SHARED_OUT_TIMEOUT >= datetime.timedelta(days=1)
