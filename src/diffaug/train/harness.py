"""One harness for the training loops: the run folder, the checkpoint, signals, the loss log and DDP.

``train_diffusion``, ``train_guidance`` and ``train_classifier`` keep their own math (the loss of one step);
everything around it lives here once:

* :class:`RunFolder`: where a run's checkpoints live (one file, or the last ``keep`` of ``checkpoints/step-*``)
  and the folder policy: a new run needs a folder without a run, ``resume`` continues from a checkpoint (or starts
  when there is none yet), ``force`` starts over (removing the old run's checkpoints, log and final outputs);
  :func:`holds_run_folder` keeps a second writer out of the folder while a run lives.
* One checkpoint layout (:class:`TrainState`): the tensors of each named module (``<name>.<key>``, e.g. ``model.``
  and ``ema.``), the optimizer state (``optim.<param>.<key>``) and one generator state per rank
  (``rng.rank<r>``); the JSON metadata holds the step, the run's config, the optimizer's param groups, the LR
  scheduler, the grad scaler, the number of ranks and any extra data position. Written atomically.
  :func:`read_checkpoint` loads one and :meth:`Checkpoint.check_config` refuses changed settings.
* :class:`StopSignal`: SIGTERM / SIGINT set a flag; the loop saves at the next step boundary and exits.
* :class:`LossLog`: ``metrics.jsonl`` / ``log.jsonl`` rows kept on the device between writes; rewound on resume.
* :func:`run_steps`: the step loop that ties them together (progress bar, log, checkpoint cadence, signals).
* The data and randomness of a step: :func:`batch_indices` (the global batch of a step; under torchrun each rank
  takes its :func:`~diffaug.utils.distributed.rank_share`) and :func:`rank_generator`.
* DDP helpers live in :mod:`diffaug.utils.distributed` (:func:`init_distributed`, :class:`Dist`,
  :func:`data_parallel`, :func:`gather_objects`, :func:`any_rank`).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import InputError
from ..utils import accel, checkpoint as ckpt
from ..utils.distributed import Dist, any_rank, gather_objects, main_process
from ..utils.locking import holds_folder

CKPT_DIR = "checkpoints"


# ---------------------------------------------------------------------- the run folder
@dataclass
class RunFolder:
    """A training run's folder: where its checkpoints live and what a new, resumed or forced run may find there.

    Args:
        out: the folder.
        finished: the file whose presence means the run completed (written last).
        outputs: further files a ``force`` start removes (the log, the final weights).
        checkpoint_file: one checkpoint, overwritten in place (atomically); ``None``: ``checkpoints/step-*``,
            of which the last ``keep`` are kept.
        keep: how many ``checkpoints/step-*`` files to keep.
    """

    out: Path
    finished: str
    outputs: tuple[str, ...] = ()
    checkpoint_file: str | None = None
    keep: int = 1

    def checkpoints(self) -> list[Path]:
        """The run's checkpoints, oldest first (empty when it has none)."""
        if self.checkpoint_file is not None:
            path = self.out / self.checkpoint_file
            return [path] if path.is_file() else []
        return sorted((self.out / CKPT_DIR).glob("step-*.safetensors")) if self.out.exists() else []

    def checkpoint_path(self, step: int) -> Path:
        if self.checkpoint_file is not None:
            return self.out / self.checkpoint_file
        return self.out / CKPT_DIR / f"step-{step:08d}.safetensors"

    def check(self, resume: bool, force: bool) -> bool:
        """The folder policy, checked before any work: one-line :class:`InputError` naming the fix. Returns whether
        the run resumes: ``resume`` on a folder with no checkpoint yet and no finished run (a run killed before its
        first checkpoint, or a first launch by a requeue script that always passes ``--resume``) starts the run,
        saying so."""
        started = bool(self.checkpoints())
        finished = (self.out / self.finished).exists()
        if resume and not started:
            if finished:
                raise InputError(f"--resume given but {self.out} holds a finished run without a checkpoint; pass "
                                 "--force to start over or choose another --out")
            if main_process():
                print(f"nothing to resume in {self.out} (no checkpoint yet): starting the run", file=sys.stderr)
            return False
        if finished and not (force or resume):
            raise InputError(f"{self.out} holds a finished run; pass --force to overwrite it or choose another --out")
        if started and not (resume or force):
            raise InputError(f"{self.out} holds an unfinished run; pass --resume to continue it or --force to start "
                             "over")
        return resume

    def read_latest(self) -> "Checkpoint":
        """The newest checkpoint, read; a damaged one is named with the way out (an older intact checkpoint, where
        one is kept, after deleting it)."""
        found = self.checkpoints()
        try:
            return read_checkpoint(found[-1])
        except InputError as e:
            if len(found) < 2:
                raise
            raise InputError(f"{e} (or delete {found[-1]} to resume from the previous checkpoint, "
                             f"{found[-2].name})") from None

    def clear(self) -> None:
        """Remove a previous run's checkpoints, log and final outputs (``force``)."""
        for p in self.checkpoints() + [self.out / name for name in (*self.outputs, self.finished)]:
            p.unlink(missing_ok=True)

    def prune(self) -> None:
        """Keep the last ``keep`` checkpoints."""
        if self.checkpoint_file is None:
            for old in self.checkpoints()[: -self.keep]:
                old.unlink(missing_ok=True)


holds_run_folder = holds_folder("out_dir")  # a training function ``train(cfg, out_dir, ...)`` under exclusive


def check_checkpointing(checkpoint_every: int, keep: int = 1) -> None:
    """One-line :class:`InputError` unless a run saves every ``checkpoint_every >= 1`` steps and keeps ``keep >= 1``
    checkpoints (a config's ``validate``, before any work)."""
    if checkpoint_every < 1:
        raise InputError(f"--checkpoint-every must be >= 1 (steps between checkpoints), got {checkpoint_every}")
    if keep < 1:
        raise InputError(f"keep_checkpoints must be >= 1 (the resume point), got {keep}")


# ---------------------------------------------------------------------- the checkpoint
@dataclass
class Checkpoint:
    """A checkpoint read back: its tensors, its JSON metadata and where it came from."""

    tensors: dict[str, torch.Tensor]
    meta: dict
    path: Path

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def check_config(self, now: dict, may_change: tuple[str, ...], defaults: dict, out: Path) -> None:
        """Refuse a resume whose settings differ from the checkpoint's (except ``may_change``); a setting the
        checkpoint predates counts as its value in ``defaults``."""
        changed = ckpt.changed_settings(self.meta.get("config", {}), now, may_change, defaults)
        if changed:
            raise InputError(f"--resume with settings that differ from the run in {out} ({', '.join(changed)}); "
                             "resume with the original settings or start over with --force")

    def check_world(self, dist_info: Dist, out: Path) -> None:
        world = self.meta.get("world", 1)  # diffaug before the harness wrote no "world" for one process
        if world != dist_info.world:
            raise InputError(f"the run in {out} used {world} process{'es' if world != 1 else ''}; resume with the same "
                             "number")

    def generator_state(self, rank: int) -> torch.Tensor:
        if rank == 0 and "rng.generator" in self.tensors:  # written by diffaug before the harness (one process)
            return self.tensors["rng.generator"]
        return self.tensors[f"rng.rank{rank}"]


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by :meth:`TrainState.save`, or by diffaug before the harness (train-diffusion and
    train-guidance wrote their one generator as ``rng.generator`` and no ``world``: both are still read)."""
    tensors, meta = ckpt.load_safetensors(path)
    return Checkpoint(tensors, meta, Path(path))


@dataclass
class TrainState:
    """Everything a run needs to continue bitwise: named modules (a model, its EMA), the optimizer, the LR
    scheduler, the grad scaler and this rank's generator."""

    modules: dict[str, nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    generator: torch.Generator

    def save(self, path: Path, step: int, config: dict, generator_states: list[torch.Tensor],
             extra: dict | None = None) -> None:
        """Write the checkpoint of ``step`` (``generator_states``: every rank's, in rank order) atomically."""
        tensors, opt_plain = ckpt.flatten_optimizer_state(self.optimizer.state_dict())
        for name, module in self.modules.items():
            tensors.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        for r, state in enumerate(generator_states):
            tensors[f"rng.rank{r}"] = state
        meta = {"step": step, "config": config, "optimizer": opt_plain, "lr_scheduler": self.scheduler.state_dict(),
                "grad_scaler": self.scaler.state_dict(), "world": len(generator_states), **(extra or {})}
        ckpt.save_safetensors(tensors, path, metadata=meta)

    def restore(self, saved: Checkpoint, rank: int = 0) -> int:
        """Load ``saved`` into the modules, optimizer, scheduler, scaler and generator; returns its step."""
        for name, module in self.modules.items():
            prefix = name + "."
            ckpt.load_state(module, {k[len(prefix):]: v for k, v in saved.tensors.items() if k.startswith(prefix)},
                            saved.path)
        self.optimizer.load_state_dict(ckpt.unflatten_optimizer_state(saved.tensors, saved.meta["optimizer"]))
        self.scheduler.load_state_dict(saved.meta["lr_scheduler"])
        if saved.meta.get("grad_scaler"):
            self.scaler.load_state_dict(saved.meta["grad_scaler"])
        self.generator.set_state(saved.generator_state(rank))
        return saved.step


# ---------------------------------------------------------------------- signals and the loss log
class StopSignal:
    """While active, SIGTERM and SIGINT only set :attr:`signum`: the loop saves at the next step boundary and
    exits with ``128 + signum``. A no-op outside the main thread (Python delivers signals there only)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}


class LossLog:
    """A run's JSONL log. Rows (with device scalars under ``"loss"``) are held until a checkpoint:
    :meth:`to_host` copies their losses to the host at once, :meth:`flush` appends them (on the main rank)."""

    def __init__(self, path: Path, main: bool = True):
        self.path, self.main, self.rows = Path(path), main, []

    def start(self, resume_step: int | None, final_key: str | None = None) -> None:
        """A new run starts an empty log; a resumed one drops the rows after its checkpoint's step."""
        if not self.main:
            return
        if resume_step is None:
            ckpt.write_text(self.path, "")
        else:
            ckpt.rewind_jsonl(self.path, resume_step, final_key=final_key)

    def add(self, row: dict) -> None:
        self.rows.append(row)

    def to_host(self) -> list[dict]:
        return accel.losses_to_host(self.rows)

    def flush(self) -> None:
        if self.main:
            ckpt.append_jsonl(self.path, self.rows)
        self.rows = []


# ---------------------------------------------------------------------- the loop
@dataclass
class Run:
    """One training run: its folder, state, log, config and ranks; :func:`run_steps` drives it."""

    folder: RunFolder
    state: TrainState
    log: LossLog
    config: dict
    name: str
    dist: Dist = field(default_factory=Dist)
    extra_meta: Callable[[list[dict]], dict] | None = None  # at a save: more metadata (may annotate the rows)
    seconds_before: float = 0.0  # training time of the earlier segments of a resumed run (from its checkpoint)
    started: float = field(default_factory=time.perf_counter)  # when this segment started (:meth:`start`)

    def seconds(self) -> float:
        """Training time so far, over every segment of a resumed run (each checkpoint records it)."""
        return self.seconds_before + time.perf_counter() - self.started

    def start(self, resume: bool, force: bool, config_file: str, may_change: tuple[str, ...], defaults: dict,
              final_key: str | None = None, saved: Checkpoint | None = None, total: int | None = None) -> int:
        """Restore the latest checkpoint (``resume``) or start a new run (writing the config); returns the step.
        ``saved``: the checkpoint, if the caller read it earlier (e.g. to check its config before any work).
        ``total``: the run's steps, which a resumed checkpoint must not be beyond."""
        if resume:
            saved = saved or self.folder.read_latest()
            saved.check_config(self.config, may_change, defaults, self.folder.out)
            saved.check_world(self.dist, self.folder.out)
            if total is not None and saved.step > total:
                raise InputError(f"the checkpoint in {self.folder.out} is at step {saved.step}, beyond --steps "
                                 f"{total}; resume with --steps >= {saved.step}")
            step = self.state.restore(saved, self.dist.rank)
            self.log.start(step, final_key)
            self.seconds_before, self.started = float(saved.meta.get("seconds", 0.0)), time.perf_counter()
            return step
        if self.dist.main:
            if force:
                self.folder.clear()
            ckpt.write_json(self.folder.out / config_file, self.config)
        self.log.start(None)
        self.seconds_before, self.started = 0.0, time.perf_counter()
        return 0

    def save(self, step: int) -> None:
        """At a step boundary (every rank): write the log and, on the main rank, the checkpoint. Under torchrun
        each logged loss is the mean of the ranks' losses (:func:`mean_over_ranks`): with equal shares, the loss of
        the whole global batch, as one process would log it."""
        rows = mean_over_ranks(self.log.to_host(), self.dist)
        states = gather_objects(self.state.generator.get_state(), self.dist)
        extra = {**(self.extra_meta(rows) if self.extra_meta is not None else {}), "seconds": self.seconds()}
        self.log.flush()
        if self.dist.main:
            self.state.save(self.folder.checkpoint_path(step), step, self.config, states, extra)
            self.folder.prune()


def mean_over_ranks(rows: list[dict], dist_info: Dist, key: str = "loss") -> list[dict]:
    """Replace each row's host float ``row[key]`` by its mean over the ranks (the same rows, step for step, on every
    rank; one gather per checkpoint, not per step). Unchanged on one process."""
    if dist_info.world == 1 or not rows:
        return rows
    per_rank = gather_objects([row[key] for row in rows], dist_info)
    for row, values in zip(rows, zip(*per_rank)):
        row[key] = sum(values) / len(values)
    return rows


def run_steps(run: Run, start: int, total: int, step_fn: Callable[[int], dict], *, checkpoint_every: int,
              progress: bool = True, desc: str | None = None) -> None:
    """Steps ``start .. total - 1``: ``step_fn(step)`` does one optimiser step and returns its log row (the
    loss a device scalar); every ``checkpoint_every`` steps, at the end, and at the first step boundary after
    SIGTERM / SIGINT (then exiting with ``128 + signal``), the log is written and the checkpoint saved."""
    from tqdm.auto import tqdm

    bar = tqdm(range(start, total), initial=start, total=total, disable=not (progress and run.dist.main),
               desc=desc or run.name)
    with StopSignal() as stop:
        try:
            for step in bar:
                run.log.add(step_fn(step))
                interrupted = any_rank(stop.signum is not None, run.dist)
                if (step + 1) % checkpoint_every == 0 or step + 1 == total or interrupted:
                    recent = run.log.rows[-50:]
                    run.save(step + 1)
                    bar.set_postfix(loss=f"{sum(r['loss'] for r in recent) / max(1, len(recent)):.4f}")
                if interrupted:
                    if run.dist.main:
                        print(f"{run.name}: stopped by signal at step {step + 1}; checkpoint saved, continue with "
                              "the same command and --resume (a study: the same command)")
                    raise SystemExit(128 + (stop.signum or signal.SIGTERM))
        finally:
            bar.close()


def rank_generator(seed: int, dist_info: Dist, device: torch.device) -> torch.Generator:
    """This rank's generator of a loop's random draws: seeded with ``seed`` on one process (as before the loops ran
    under torchrun, so a one-process run is unchanged), with ``seed * 1000 + rank`` under torchrun (as
    ``diffaug train``'s), so the ranks draw different noise."""
    return torch.Generator(device=device).manual_seed(seed if dist_info.world == 1 else seed * 1000 + dist_info.rank)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of the batch at ``step``: a pure function of (seed, epoch, position), so resume is exact."""
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[pos * batch_size : (pos + 1) * batch_size]
