"""DDP helpers: joining torchrun's process group, wrapping a model, gathering across ranks."""

from __future__ import annotations

import atexit
import datetime
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import NoReturn

import torch
from torch import nn

from ..errors import InputError


@dataclass
class Dist:
    """This process's place among the ranks torchrun started (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world_size() -> int:
    """The number of processes torchrun started (1 when run alone), read before joining any process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def main_process() -> bool:
    """Whether this is rank 0 (or the only process), read before joining any process group (e.g. to print once)."""
    return os.environ.get("RANK", "0") == "0"


_joined = False  # whether this process ever joined a process group through init_distributed


def local_device(device: str | torch.device) -> torch.device:
    """This process's device: under torchrun (several processes), a bare ``cuda`` means ``cuda:LOCAL_RANK``, one
    GPU per process as torchrun's ``--nproc_per_node`` intends (``cuda:0`` where each process sees one GPU only),
    and becomes the current CUDA device (NCCL and
    ``torch.cuda`` calls without an index use it). Alone, or given ``cpu`` or ``cuda:N``, it is ``device`` as
    given (``cuda:N`` under torchrun is still made current)."""
    device = torch.device(device)
    if device.type != "cuda" or world_size() == 1:
        return device
    if device.index is None:
        local_rank, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if count == 0:
            raise InputError("--device cuda under torchrun, but this process sees no CUDA device; use --device cpu")
        if count == 1:  # one GPU per process (CUDA_VISIBLE_DEVICES set per rank, e.g. by SLURM): it is this one
            local_rank = 0
        elif local_rank >= count:
            raise InputError(f"torchrun started local rank {local_rank} but this machine has {count} CUDA "
                             f"device(s); use --nproc_per_node {count} or fewer")
        device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


LAUNCHER_POLL_SECONDS = 1.0
_following = False  # whether this process already watches its launcher


def follow_launcher(interval: float = LAUNCHER_POLL_SECONDS) -> None:
    """Under torchrun (``LOCAL_RANK`` set), send this process SIGTERM once its launcher, the parent, is gone.

    torchrun forwards SIGTERM / SIGINT to its ranks, but a SIGKILLed launcher (an OOM killer, ``kill -9``, a
    scheduler's hard stop of the launching shell) leaves them running, orphaned, writing the run folder. A daemon
    thread polls the parent's pid every ``interval`` seconds; when it changes (the orphan is re-parented), the
    rank gets SIGTERM: a training loop saves a checkpoint at the next step boundary and exits (the ranks agree on
    the step), a job without such a handler ends as on any SIGTERM (certify's rows are written as they finish).
    A no-op when not under torchrun, when already orphaned, and the second time."""
    global _following
    parent = os.getppid()
    if _following or "LOCAL_RANK" not in os.environ or parent <= 1:
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        # every rank that notices says so (the first may not be rank 0: the ranks then agree to stop together)
        print(f"rank {os.environ.get('RANK', '0')}: the torchrun launcher is gone: stopping this run", file=sys.stderr,
              flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="diffaug-follow-launcher", daemon=True).start()
    _following = True


SHARED_OUT_TIMEOUT = datetime.timedelta(days=7)  # a sharded evaluation's one collective: the end of every share


def init_distributed(device: torch.device, timeout: datetime.timedelta | None = None) -> Dist:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); a no-op when run alone. ``device`` is
    this process's own (:func:`local_device`). A process torchrun started also stops when torchrun is gone
    (:func:`follow_launcher`). ``timeout``: how long a collective may wait (PyTorch's default otherwise: 30 min for
    gloo, 10 for NCCL); a job whose only collective is a barrier after each rank's share of the work (certify,
    eval-shift: shares of unequal cost) passes :data:`SHARED_OUT_TIMEOUT`, so a rank done hours before the slowest
    waits for it instead of timing out.

    A group joined here is also left at exit (:func:`leave_distributed`, registered with :mod:`atexit`); end such
    a process with :func:`exit_process` (the CLI does) so that the interpreter's teardown cannot abort it."""
    follow_launcher()
    if world_size() == 1:
        return Dist()
    import torch.distributed as dist

    global _joined
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                **({"timeout": timeout} if timeout is not None else {}))
        atexit.register(leave_distributed)
        _joined = True
    return Dist(dist.get_rank(), dist.get_world_size())


def leave_distributed() -> None:
    """Destroy the default process group if one is up (a no-op otherwise, so it is safe to call twice)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End this process with exit status ``code``: as ``sys.exit`` does, except in a process that has joined a
    process group, which ends without the interpreter's teardown.

    A gloo worker thread releases the tensors of a collective only after the caller has seen it complete. When
    that release comes after Python has begun its teardown, freeing a tensor that Python also refers to waits for
    the GIL, Python ends the thread there, and the unwinding through a C++ destructor aborts the process
    ("terminate called without an active exception", SIGABRT, after all its work has succeeded). It is a race a
    loaded machine loses now and then (pytorch/pytorch#179291 tried to fix it). Destroying the group does not stop
    those threads while a ``DistributedDataParallel`` still refers to it, so nothing can wait for them. Such a
    process therefore does here, while Python is whole, what the teardown would do first: it joins its Python
    threads and runs its exit handlers (which leave the group), flushes its standard streams, then ends with
    ``os._exit``."""
    import torch.distributed as dist

    if not (_joined or (dist.is_available() and dist.is_initialized())):
        sys.exit(code)
    threading._shutdown()  # what the interpreter's teardown does first: join the non-daemon threads
    atexit._run_exitfuncs()  # then the exit handlers, leave_distributed among them
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # no stream, a closed pipe or file: nothing left to write to
            pass
    os._exit(code)


def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` whose gradients are views of its all-reduce buckets, laid out as the buckets.

    Each parameter gets a zero gradient before wrapping and ``gradient_as_bucket_view=True``, so DDP makes every
    ``.grad`` a view of its bucket and each backward accumulates into it in place; zero the gradients in place
    (``zero_grad(set_to_none=False)``), never to None. Otherwise autograd may hand DDP a gradient of another
    layout (the layout contract ignores the strides of size-1 dims, which a ``[C, 1, k, k]`` convolution weight
    has and oneDNN's backward sets its own way), which DDP then copies into the bucket on every step with the
    warning "Grad strides do not match bucket view strides". It also saves one gradient-sized copy per step.
    """
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)  # same strides as p, hence as its bucket view
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               gradient_as_bucket_view=True)


def check_batch_split(batch_size: int, world: int, what: str = "batch size") -> None:
    """One-line :class:`InputError` unless a global batch of ``batch_size`` splits evenly over ``world`` ranks."""
    if world > 1 and batch_size % world:
        raise InputError(f"{what} {batch_size} is not divisible by {world} ranks; pass a --batch-size that is a "
                         f"multiple of {world}")


def rank_share(indices: torch.Tensor, dist_info: Dist) -> torch.Tensor:
    """This rank's contiguous share of a global batch's ``indices`` (all of them on one process).

    Every index lands on exactly one rank, in order, so the ranks together see the batch one process would; with
    equal shares, the mean of the ranks' mean losses (what DDP's averaged gradient is the gradient of) is the mean
    loss of the whole batch."""
    return indices.tensor_split(dist_info.world)[dist_info.rank] if dist_info.world > 1 else indices


def gather_objects(value, dist_info: Dist) -> list:
    """``value`` (any picklable object, e.g. a generator state or a count) of every rank, in rank order."""
    if dist_info.world == 1:
        return [value]
    import torch.distributed as dist

    values = [None] * dist_info.world
    dist.all_gather_object(values, value)
    return values


def any_rank(flag: bool, dist_info: Dist) -> bool:
    """True on every rank when ``flag`` is true on any rank (e.g. one of them got SIGTERM)."""
    if dist_info.world == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=torch.cuda.current_device() if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
