"""One writer per output folder: :func:`exclusive` holds an ``flock`` on ``OUT/.lock`` while a job writes ``OUT``.

Training runs (:func:`diffaug.train.harness.holds_run_folder`), ``certify`` (which appends to its per-rank rows and
resumes) and the study (which deletes and rebuilds its stage folders) take it, so a second job started on the same
folder (a resume beside a live run, the ranks of a torchrun whose launcher was killed, two studies on one root) is
refused in one line instead of interleaving its writes with the first.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
from pathlib import Path
from typing import Callable

from ..errors import InputError
from .distributed import main_process

LOCK_FILE = ".lock"  # held (flock) by the process that writes the folder


@contextlib.contextmanager
def exclusive(out: str | os.PathLike):
    """Hold the run folder ``out`` for one writer while the block runs: an ``flock`` on ``out/.lock`` (released by
    the kernel whatever ends the process, SIGKILL included). A second run into the same folder (a resume started
    while the first still runs, or ranks of a torchrun whose launcher was killed) is refused in one line. Only the
    main process takes it (the other ranks of a run write no shared file); where ``fcntl`` is missing (Windows)
    nothing is locked. A folder this made and nothing else wrote to is removed again."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        fcntl = None
    out = Path(out)
    if fcntl is None or not main_process() or (out.exists() and not out.is_dir()):  # a file: the checks name it
        yield
        return
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise InputError(f"another run is writing to {out} (process {holder}); wait for it to end or stop it, "
                             "then run again (a torchrun whose launcher was killed leaves its ranks running: stop "
                             "them too)") from None
        except OSError:  # a file system without flock (Lustre without -o flock, some NFS): run unguarded
            print(f"note: {out} cannot be locked on this file system; make sure one run writes it at a time",
                  file=sys.stderr)
            locked = False
        if locked:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
        try:
            yield
        finally:
            if locked:
                fcntl.flock(f, fcntl.LOCK_UN)
            if made and [p.name for p in out.iterdir()] == [LOCK_FILE]:  # refused before any output
                path.unlink(missing_ok=True)
                out.rmdir()


def holds_folder(argument: str) -> Callable[[Callable], Callable]:
    """Decorator: the job runs under :func:`exclusive` on its folder argument named ``argument``."""
    def decorate(job: Callable) -> Callable:
        signature = inspect.signature(job)

        @functools.wraps(job)
        def run(*args, **kwargs):
            with exclusive(signature.bind(*args, **kwargs).arguments[argument]):
                return job(*args, **kwargs)
        return run
    return decorate
