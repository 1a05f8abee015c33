"""The training harness: run-folder policy, the checkpoint round trip, signals, the log; and what every loop gains
from it (SIGTERM -> checkpoint -> bitwise resume, --force) for train-diffusion and train-guidance."""

import os
import signal

import pytest
import torch
from torch import nn

from diffaug import InputError
from diffaug.utils import accel
from diffaug.utils.checkpoint import load_safetensors, read_jsonl, save_safetensors
from diffaug.train.harness import LossLog, Run, RunFolder, StopSignal, TrainState, read_checkpoint, run_steps
from diffaug.utils.distributed import Dist


# ---------------------------------------------------------------------- the harness itself
def _state(seed=0):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + p.numel())))
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9),
                                              use_buffers=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
    gen = torch.Generator().manual_seed(seed)
    return TrainState({"model": model, "ema": ema}, opt, sched, torch.amp.GradScaler("cpu", enabled=False), gen)


def _step(state: TrainState, step: int) -> dict:
    model = state.modules["model"]
    x = torch.randn(8, 3, generator=state.generator)
    loss = model(x).pow(2).mean()
    accel.optimizer_step(loss, state.optimizer, state.scaler)
    state.scheduler.step()
    state.modules["ema"].update_parameters(model)
    return {"step": step + 1, "loss": loss.detach()}


def _weights(state: TrainState) -> dict:
    return {f"{n}.{k}": v.clone() for n, m in state.modules.items() for k, v in m.state_dict().items()}


def _run(tmp_path, name, state, **folder):
    out = tmp_path / name
    return Run(RunFolder(out, finished="done", **folder), state, LossLog(out / "log.jsonl"), {"lr": 1}, "toy")


@pytest.mark.parametrize("placement", [{"checkpoint_file": "checkpoint.safetensors"}, {"keep": 2}])
def test_sigterm_saves_at_the_step_boundary_and_resume_is_bitwise(tmp_path, placement):
    straight = _run(tmp_path, "straight", _state(), **placement)
    run_steps(straight, straight.start(False, False, "config.json", (), {}), 9, lambda s: _step(straight.state, s),
              checkpoint_every=4, progress=False)

    cut = _run(tmp_path, "cut", _state(), **placement)
    before = signal.getsignal(signal.SIGTERM)

    def step_then_signal(s):
        row = _step(cut.state, s)
        if s == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by StopSignal: the step finishes, then a save
        return row

    with pytest.raises(SystemExit) as stopped:
        run_steps(cut, cut.start(False, False, "config.json", (), {}), 9, step_then_signal, checkpoint_every=4,
                  progress=False)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # the handler restored
    assert read_checkpoint(cut.folder.checkpoints()[-1]).step == 6
    assert len(cut.folder.checkpoints()) == (1 if "checkpoint_file" in placement else 2)  # keep-last-k

    resumed = _run(tmp_path, "cut", _state(seed=1), **placement)  # other initial weights: all come from the file
    start = resumed.start(True, False, "config.json", (), {})
    assert start == 6
    run_steps(resumed, start, 9, lambda s: _step(resumed.state, s), checkpoint_every=4, progress=False)
    a, b = _weights(straight.state), _weights(resumed.state)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_jsonl(tmp_path / "cut" / "log.jsonl") == read_jsonl(tmp_path / "straight" / "log.jsonl")
    assert [r["step"] for r in read_jsonl(tmp_path / "cut" / "log.jsonl")] == list(range(1, 10))


def test_checkpoint_layout_and_an_older_layout(tmp_path):
    state = _state()
    for s in range(3):
        _step(state, s)
    path = tmp_path / "c.safetensors"
    state.save(path, 3, {"lr": 1}, [state.generator.get_state()], extra={"position": [3, 0]})
    tensors, meta = load_safetensors(path)
    assert {k.split(".")[0] for k in tensors} == {"model", "ema", "optim", "rng"} and "rng.rank0" in tensors
    assert meta["step"] == 3 and meta["world"] == 1 and meta["position"] == [3, 0] and meta["config"] == {"lr": 1}
    # diffaug before the harness wrote one generator as rng.generator and no "world": still read
    tensors["rng.generator"] = tensors.pop("rng.rank0")
    del meta["world"]
    save_safetensors(tensors, path, metadata=meta)
    fresh = _state(seed=5)
    assert fresh.restore(read_checkpoint(path)) == 3
    assert torch.equal(fresh.generator.get_state(), state.generator.get_state())
    a, b = _weights(state), _weights(fresh)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(_step(fresh, 3)["loss"], _step(state, 3)["loss"])  # optimizer and scheduler restored too
    saved = read_checkpoint(path)
    with pytest.raises(InputError, match=r"differ from the run in .* \(lr\); resume with the original settings"):
        saved.check_config({"lr": 2, "steps": 9}, ("steps",), {}, tmp_path)
    saved.check_config({"lr": 1, "steps": 9}, ("steps",), {}, tmp_path)
    with pytest.raises(InputError, match="used 1 process; resume with the same number"):
        saved.check_world(Dist(0, 2), tmp_path)


def test_run_folder_policy(tmp_path):
    out = tmp_path / "run"
    for folder in (RunFolder(out, finished="model.json", outputs=("log.jsonl",), keep=2),
                   RunFolder(out, finished="model.json", outputs=("log.jsonl",), checkpoint_file="c.safetensors")):
        assert folder.check(resume=False, force=False) is False  # a new folder
        assert folder.check(resume=True, force=False) is False  # nothing to resume yet: the run starts
        for step in (1, 2, 3):
            folder.checkpoint_path(step).parent.mkdir(parents=True, exist_ok=True)
            folder.checkpoint_path(step).write_bytes(b"x")
            folder.prune()
        assert [p.name for p in folder.checkpoints()] == (["step-00000002.safetensors", "step-00000003.safetensors"]
                                                          if folder.checkpoint_file is None else ["c.safetensors"])
        with pytest.raises(InputError, match="holds an unfinished run; pass --resume to continue it or --force"):
            folder.check(resume=False, force=False)
        (out / "model.json").write_text("{}")
        (out / "log.jsonl").write_text("")
        with pytest.raises(InputError, match="holds a finished run; pass --force to overwrite it"):
            folder.check(resume=False, force=False)
        assert folder.check(resume=True, force=False) is True
        folder.check(resume=False, force=True)
        folder.clear()
        (out / "model.json").write_text("{}")
        with pytest.raises(InputError, match="holds a finished run without a checkpoint"):
            folder.check(resume=True, force=False)
        (out / "model.json").unlink()
        assert not folder.checkpoints() and not (out / "model.json").exists() and not (out / "log.jsonl").exists()


def test_stop_signal_and_log(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before
    log = LossLog(tmp_path / "log.jsonl")
    log.start(None)
    for s in range(4):
        log.add({"step": s + 1, "loss": torch.tensor(float(s))})
    log.to_host()
    log.flush()
    log.add({"step": 5, "loss": torch.tensor(5.0)})
    log.to_host()
    log.flush()
    log.start(3)  # resume from step 3
    assert read_jsonl(tmp_path / "log.jsonl") == [{"step": s + 1, "loss": float(s)} for s in range(3)]


def test_the_logged_loss_is_the_mean_over_ranks(monkeypatch):
    from diffaug.train import harness

    rows = [{"step": 1, "loss": 1.0, "lr": 0.1}, {"step": 2, "loss": 4.0, "lr": 0.1}]
    assert harness.mean_over_ranks([dict(r) for r in rows], Dist()) == rows  # one process: unchanged, no gather
    gathered = []

    def two_ranks(value, dist_info):  # rank 0 holds ``value``; rank 1 logged 3.0 and 0.0 at the same steps
        gathered.append(value)
        return [value, [3.0, 0.0]]

    monkeypatch.setattr(harness, "gather_objects", two_ranks)
    mean = harness.mean_over_ranks([dict(r) for r in rows], Dist(0, 2))
    assert gathered == [[1.0, 4.0]]  # one gather for all rows
    assert mean == [{"step": 1, "loss": 2.0, "lr": 0.1}, {"step": 2, "loss": 2.0, "lr": 0.1}]
    assert harness.mean_over_ranks([], Dist(0, 2)) == [] and len(gathered) == 1


# ---------------------------------------------------------------------- the loops
def _stopped_by_sigterm(monkeypatch, at: int, train, out) -> None:
    """Run ``train(out)`` with SIGTERM sent to this process during optimiser step ``at`` (0-based); check that
    it saved and exited with 128 + SIGTERM at the end of that step."""
    original, calls = accel.optimizer_step, []

    def step_with_signal(*args, **kwargs):
        if len(calls) == at:
            os.kill(os.getpid(), signal.SIGTERM)  # the real handler runs; the step goes on
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(accel, "optimizer_step", step_with_signal)
    with pytest.raises(SystemExit) as stopped:
        train(out)
    monkeypatch.setattr(accel, "optimizer_step", original)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert load_safetensors(out / "checkpoint.safetensors")[1]["step"] == at + 1


def _same_run(a, b, files) -> None:
    """Bitwise equal weights (and checkpoint, with its optimizer and generator) and equal logs."""
    for name in files:
        ta, tb = load_safetensors(a / name)[0], load_safetensors(b / name)[0]
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (name, k)
    assert read_jsonl(a / "log.jsonl") == read_jsonl(b / "log.jsonl")


def test_train_diffusion_sigterm_resume_and_force(tmp_path, monkeypatch, capsys):
    from diffaug.cli import main
    from diffaug.train.diffusion import DiffusionTrainConfig, train_diffusion

    cfg = DiffusionTrainConfig(steps=7, batch_size=16, width=8, checkpoint_every=100, warmup_steps=2,
                               sample_grid=False)
    train_diffusion(cfg, tmp_path / "straight", progress=False)
    _stopped_by_sigterm(monkeypatch, 3, lambda out: train_diffusion(cfg, out, progress=False), tmp_path / "cut")
    assert not (tmp_path / "cut" / "diffaug.json").exists()
    with pytest.raises(InputError, match="holds an unfinished run; pass --resume"):
        train_diffusion(cfg, tmp_path / "cut", progress=False)
    train_diffusion(cfg, tmp_path / "cut", resume=True, progress=False)
    _same_run(tmp_path / "straight", tmp_path / "cut",
              ("checkpoint.safetensors", "unet/diffusion_pytorch_model.safetensors"))

    # --force (CLI): the finished run is started over; its log holds the new run's rows only, and the old run's
    # sample grid is not left beside the new weights
    (tmp_path / "cut" / "samples.png").write_bytes(b"the old run's grid")
    assert main(["train-diffusion", "--out", str(tmp_path / "cut"), "--steps", "3", "--batch-size", "16",
                 "--width", "8", "--no-sample-grid", "--quiet", "--device", "cpu", "--force"]) == 0
    assert [r["step"] for r in read_jsonl(tmp_path / "cut" / "log.jsonl")] == [1, 2, 3]
    assert load_safetensors(tmp_path / "cut" / "checkpoint.safetensors")[1]["step"] == 3
    assert not (tmp_path / "cut" / "samples.png").exists()
    assert main(["train-diffusion", "--out", str(tmp_path / "cut"), "--steps", "7", "--quiet"]) == 2
    assert "holds a finished run; pass --force" in capsys.readouterr().err


def test_train_guidance_sigterm_resume_and_force(tmp_path, monkeypatch):
    from diffaug.train.guidance import GuidanceTrainConfig, train_guidance

    cfg = GuidanceTrainConfig(kind="noisy", steps=7, batch_size=32, width=8, checkpoint_every=100,
                              labelled_fraction=0.5, consistency_weight=0.5)
    train_guidance(cfg, tmp_path / "straight", progress=False)
    _stopped_by_sigterm(monkeypatch, 2, lambda out: train_guidance(cfg, out, progress=False), tmp_path / "cut")
    train_guidance(cfg, tmp_path / "cut", resume=True, progress=False)
    _same_run(tmp_path / "straight", tmp_path / "cut", ("checkpoint.safetensors", "guidance.safetensors"))

    with pytest.raises(InputError, match="holds a finished run; pass --force"):
        train_guidance(cfg, tmp_path / "cut", progress=False)
    forced = GuidanceTrainConfig(**{**cfg.__dict__, "seed": 1, "steps": 2})  # another run in the same folder
    train_guidance(forced, tmp_path / "cut", force=True, progress=False)
    train_guidance(forced, tmp_path / "fresh", progress=False)
    _same_run(tmp_path / "fresh", tmp_path / "cut", ("guidance.safetensors", "checkpoint.safetensors"))
    assert [r["step"] for r in read_jsonl(tmp_path / "cut" / "log.jsonl")] == [1, 2]


def test_a_second_writer_is_refused_and_resume_guards_its_checkpoint(tmp_path, capsys, monkeypatch):
    """One writer per run folder (a resume started while the first run lives, or orphaned torchrun ranks);
    --resume with no checkpoint yet starts the run; a checkpoint beyond --steps is refused; a damaged newest
    checkpoint names the older one; a permission error is one line."""
    from diffaug import cli
    from diffaug.cli import main
    from diffaug.train.classifier import TrainConfig, train_classifier
    from diffaug.utils.locking import LOCK_FILE, exclusive

    out = tmp_path / "run"
    args = ["train", "--data", "digits", "--recipe", "plain", "--steps", "4", "--checkpoint-every", "2", "--quiet",
            "--out", str(out)]
    with exclusive(out):
        assert main([*args, "--resume"]) == 2
        assert "another run is writing to" in capsys.readouterr().err
    assert not out.exists()  # refused before any output: the folder the lock made is gone again
    assert main([*args, "--resume"]) == 0  # a requeue script's first launch: nothing to resume, the run starts
    assert "nothing to resume" in capsys.readouterr().err and (out / LOCK_FILE).exists()
    assert main([*args[:-2], "--steps", "2", "--out", str(out), "--resume"]) == 2
    assert "is at step 4, beyond --steps 2" in capsys.readouterr().err
    cfg = TrainConfig(recipe="plain", steps=4, checkpoint_every=2, keep_checkpoints=2)
    train_classifier(cfg, tmp_path / "two", progress=False)
    newest = sorted((tmp_path / "two" / "checkpoints").iterdir())[-1]
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.raises(InputError, match="delete .*step-00000004.safetensors to resume from the previous checkpoint, "
                                         "step-00000002.safetensors"):
        train_classifier(TrainConfig(recipe="plain", steps=6, checkpoint_every=2, keep_checkpoints=2),
                         tmp_path / "two", resume=True, progress=False)

    def denied(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x" / "checkpoints" / "c.safetensors"))

    monkeypatch.setitem(cli.COMMANDS, "toy", cli.COMMANDS["toy"]._replace(run=denied))
    assert main(["toy", "--out", str(tmp_path / "t.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert "permission denied: " in err and "c.safetensors; make it accessible" in err and len(err.splitlines()) == 1


def test_a_file_system_without_flock_runs_unguarded_with_a_note(tmp_path, monkeypatch, capsys):
    import fcntl

    from diffaug.utils.locking import exclusive

    def no_flock(*args):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with exclusive(tmp_path / "run"):
        (tmp_path / "run" / "x").write_text("written")
    assert "cannot be locked on this file system" in capsys.readouterr().err


def test_certify_and_the_study_hold_their_folder_too(tmp_path, capsys):
    """certify (which appends rows and resumes) and the study (which deletes and rebuilds its stage folders) are
    refused beside a live job on the same --out, before any work."""
    from diffaug.cli import main
    from diffaug.utils.locking import exclusive

    for args in (["certify", "--classifier", str(tmp_path / "none"), "--sigma", "0.5"], ["study", "--quick"]):
        out = tmp_path / args[0]
        (out / "stages").mkdir(parents=True)
        with exclusive(out):
            assert main([*args, "--out", str(out)]) == 2
        assert "another run is writing to" in capsys.readouterr().err
        assert sorted(p.name for p in out.rglob("*")) == [".lock", "stages"]  # nothing touched


def test_a_resumed_run_reports_the_time_of_every_segment(tmp_path):
    """Each checkpoint records the training time so far; model.json's seconds of a resumed run add the earlier
    segments' (they counted only the last one)."""
    import json

    from diffaug.train.classifier import TrainConfig, train_classifier

    out = tmp_path / "run"
    train_classifier(TrainConfig(recipe="plain", steps=4, checkpoint_every=2), out, progress=False)
    one_go = json.loads((out / "model.json").read_text())["seconds"]
    path = out / "checkpoints" / "step-00000004.safetensors"
    tensors, meta = load_safetensors(path)
    assert 0 < meta["seconds"] <= one_go
    save_safetensors(tensors, path, {**meta, "seconds": 1000.0})  # as if the first segment had taken 1000 s
    train_classifier(TrainConfig(recipe="plain", steps=6, checkpoint_every=2), out, resume=True, progress=False)
    assert json.loads((out / "model.json").read_text())["seconds"] >= 1000.0
