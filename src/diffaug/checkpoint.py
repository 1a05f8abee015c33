"""Safe, atomic persistence: safetensors for tensors, JSON for everything else.

Every write goes to a temporary file in the destination folder, is fsynced, then renamed over the target, so
a crash leaves either the old file or the new one, never a torn one. Nothing here unpickles.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save

from .errors import InputError


_UMASK = os.umask(0)
os.umask(_UMASK)


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
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def append_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Append one JSON object per line (a log: rows are only ever added)."""
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


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
