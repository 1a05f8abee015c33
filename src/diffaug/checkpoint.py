"""Safe, atomic persistence: safetensors for tensors, JSON for everything else.

Every write goes to a temporary file in the destination folder, is fsynced, then renamed over the target, so
a crash leaves either the old file or the new one, never a torn one. Nothing here unpickles.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save

from .errors import InputError, StorageError


_UMASK = os.umask(0)
os.umask(_UMASK)

# Fault injection for the crash tests: DIFFAUG_TEST_KILL_AT_WRITE=N sends SIGKILL to this process halfway
# through its N-th write (atomic write or log append); "N+" kills right after the N-th write completes.
_KILL_AT = os.environ.get("DIFFAUG_TEST_KILL_AT_WRITE", "")
_writes = 0


def _write_fault_point(after: bool) -> None:
    if not _KILL_AT or _KILL_AT.endswith("+") != after or int(_KILL_AT.rstrip("+")) != _writes:
        return
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def _counted_write(f, data: bytes | str) -> None:
    """``f.write(data)`` with the fault point halfway, and a disk-full error that names the file and the fix."""
    global _writes
    _writes += 1
    try:
        f.write(data[: len(data) // 2])
        f.flush()
        _write_fault_point(after=False)
        f.write(data[len(data) // 2 :])
        f.flush()
        os.fsync(f.fileno())
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageError(f"no space left on the device while writing {Path(f.name).name} in "
                               f"{Path(f.name).parent}; the previous file is intact: free space and rerun "
                               "(training resumes with --resume)") from None
        raise


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            _counted_write(f, data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # left by a process killed mid-write
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    _write_fault_point(after=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write a text file (tables, reports, CSV)."""
    atomic_write_bytes(path, text.encode())


def write_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    """Atomically write ``rows`` (dicts with the first row's keys) as CSV with a header."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def write_json(path: str | os.PathLike, obj) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def _json_default(obj):
    if isinstance(obj, (Path, torch.dtype, torch.device)):
        return str(obj)
    if isinstance(obj, (tuple, set)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Atomically write a safetensors file; ``metadata`` (any JSON value) is stored under the key ``"json"``."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = None if metadata is None else {"json": json.dumps(metadata, default=_json_default)}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by :func:`save_safetensors`: ``(tensors, metadata)``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:
        raise InputError(f"cannot read {path}: {e}; the file is damaged") from None
    return tensors, json.loads(meta.get("json", "null")) or {}


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder in a temporary sibling and swap it into place on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(path.parent)
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*"):  # left by a process killed mid-build
            shutil.rmtree(stale, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` (whole lines) to a log and fsync it. A crash can tear only the last line; readers skip
    it (:func:`read_jsonl`) and resumes rewrite the log without it before appending."""
    with open(path, "a") as f:
        _counted_write(f, text)
    _write_fault_point(after=True)


def append_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Append one JSON object per line (a log: rows are only ever added; see :func:`rewind_jsonl`)."""
    append_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The complete rows of a log written by :func:`append_jsonl` (a torn last line, left by a crash, is
    skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines = lines[:-1]
    return [json.loads(line) for line in lines if line]


def rewind_jsonl(path: str | os.PathLike, step: int, final_key: str | None = None) -> None:
    """On resume: keep the log's rows up to ``step`` (the checkpoint's), dropping rows logged after it, rows
    holding ``final_key`` (an end-of-run row, written again when the run ends) and a torn last line, so the
    resumed run's log equals an uninterrupted one."""
    if Path(path).exists():
        rows = [r for r in read_jsonl(path) if r["step"] <= step and (final_key is None or final_key not in r)]
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def check_run_folder(ckpt_path: Path, out_dir: Path, resume: bool) -> None:
    """A training run's folder rule: ``resume`` needs the checkpoint, a new run needs a folder without one."""
    if resume and not ckpt_path.is_file():
        raise InputError(f"--resume given but {ckpt_path} does not exist; drop --resume to start a new run")
    if not resume and ckpt_path.exists():
        raise InputError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")


def changed_settings(saved: dict, now: dict, may_change: tuple[str, ...]) -> list[str]:
    """Keys of ``now`` whose values differ from a checkpoint's ``saved`` config, except ``may_change``."""
    return sorted(k for k in now if k not in may_change and saved.get(k) != now[k])


# ---------------------------------------------------------------------- optimizer state <-> flat tensors
def flatten_optimizer_state(state_dict: dict, prefix: str = "optim") -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into flat tensors (for safetensors) and a JSON-able remainder."""
    tensors, plain = {}, {"param_groups": state_dict["param_groups"], "state": {}}
    for idx, per_param in state_dict["state"].items():
        plain["state"][str(idx)] = {}
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{idx}.{key}"] = value
            else:
                plain["state"][str(idx)][key] = value
    return tensors, plain


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], plain: dict, prefix: str = "optim") -> dict:
    """Inverse of :func:`flatten_optimizer_state`."""
    state: dict[int, dict] = {int(i): dict(v) for i, v in plain["state"].items()}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": plain["param_groups"]}
