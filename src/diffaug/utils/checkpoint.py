"""Safe, atomic persistence: safetensors for tensors, JSON for everything else.

Every write goes to a temporary file in the destination folder, is fsynced, then renamed over the target, so
a crash leaves either the old file or the new one, never a torn one. Every safetensors file written here records
the SHA-256 of its tensors and metadata, checked when it is read, so bytes changed later (a bad disk, a torn
copy) are named instead of loaded. Nothing here unpickles.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save

from ..errors import InputError, StorageError


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


def _counted_write(f, data: bytes | str, path: Path) -> None:
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
            raise StorageError(f"no space left on the device while writing {path.name} in "
                               f"{path.parent}; the previous file is intact: free space and rerun "
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
            _counted_write(f, data, path)
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
    """Atomically write a safetensors file; ``metadata`` (any JSON value) is stored under the key ``"json"``, the
    tensors' SHA-256 (:func:`tensors_digest`) under ``"sha256"``."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {} if metadata is None else {"json": json.dumps(metadata, default=_json_default)}
    meta["sha256"] = tensors_digest(tensors, meta.get("json", ""))
    atomic_write_bytes(path, save(tensors, metadata=meta))


def tensors_digest(tensors: dict[str, torch.Tensor], text: str = "") -> str:
    """SHA-256 (hex) of ``text`` (a file's JSON metadata) and contiguous CPU tensors: each one's name, dtype, shape
    and bytes, in name order."""
    h = hashlib.sha256(text.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{str(t.dtype)}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_HEADER = 100 * 2**20


def check_safetensors_header(path: str | os.PathLike) -> dict:
    """Validate a safetensors file's header before any tensor is read: its length, JSON, every tensor's dtype,
    shape and byte range (inside the file, sized ``prod(shape) * itemsize``, not overlapping). Returns the
    header; raises :class:`InputError` naming the problem otherwise."""
    path = Path(path)
    size = path.stat().st_size
    damaged = f"{path} is damaged (not a valid safetensors file)"
    fix = "copy or train it again"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"{damaged}: {size} bytes, too short for a header; {fix}")
        n = int.from_bytes(head, "little")
        if n > min(_MAX_HEADER, size - 8):
            raise InputError(f"{damaged}: header length {n} exceeds the file ({size} bytes); {fix}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InputError(f"{damaged}: its header is not JSON; {fix}") from None
    if not isinstance(header, dict):
        raise InputError(f"{damaged}: its header is not a JSON object; {fix}")
    data_bytes, spans = size - 8 - n, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise InputError(f"{damaged}: tensor {name!r} lacks dtype, shape or data_offsets; {fix}") from None
        if dtype not in _DTYPE_BYTES:
            raise InputError(f"{damaged}: tensor {name!r} has unknown dtype {dtype!r}; {fix}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise InputError(f"{damaged}: tensor {name!r} has shape {shape!r}; {fix}")
        want = _DTYPE_BYTES[dtype] * math.prod(shape)
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_bytes) \
                or end - begin != want:
            raise InputError(f"{damaged}: tensor {name!r} ({dtype} {shape}, {want} bytes) has byte range "
                             f"[{begin}, {end}) in a {data_bytes}-byte buffer; {fix}")
        spans.append((begin, end))
    spans.sort()
    if any(a_end > b_begin for (_, a_end), (b_begin, _) in zip(spans, spans[1:])):
        raise InputError(f"{damaged}: tensors overlap in the buffer; {fix}")
    return header


def read_safetensors(path: str | os.PathLike, what: str = "weights file") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, its header validated first; one-line :class:`InputError` otherwise."""
    return _read_safetensors(path, what)[0]


def _read_safetensors(path, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist")
    header = check_safetensors_header(path)
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors' own error types
        raise InputError(f"cannot read {path}: {str(e).splitlines()[0]}; the file is damaged, copy or train it "
                         "again") from None
    meta = header.get("__metadata__") or {}
    recorded = meta.get("sha256")  # files from elsewhere, and diffaug's before 2026-12-08, record none
    if recorded is not None and tensors_digest(tensors, meta.get("json", "")) != recorded:
        raise InputError(f"{path} is damaged: its tensors or metadata do not match the SHA-256 written with them "
                         "(changed on disk or in a copy); copy or train it again")
    return tensors, header


def read_state_dict(path: str | os.PathLike, what: str = "weights file") -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file, or from a ``.pt`` / ``.pth`` read with
    ``torch.load(..., weights_only=True)`` (pickled objects are refused, never run; a training checkpoint's
    ``state_dict`` or ``model`` entry is taken). One-line :class:`InputError` for a missing file, a file that is
    not a plain state dict, or one whose values are not all tensors."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist")
    if path.suffix == ".safetensors":
        return read_safetensors(path, what)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = ("it holds Python objects besides tensors, which are not unpickled" if "Weights only load failed"
               in str(e) else f"not a readable PyTorch file ({type(e).__name__}: damaged, truncated or another "
                              "format)")
        raise InputError(f"{path} is not a plain state dict: {why}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict", state.get("model")), dict):
        state = state.get("state_dict", state.get("model"))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path} does not hold a state dict of tensors")
    return state


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by :func:`save_safetensors`: ``(tensors, metadata)``."""
    tensors, header = _read_safetensors(path, "checkpoint")
    raw = (header.get("__metadata__") or {}).get("json", "null")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise InputError(f"{path} has damaged metadata (not JSON); copy or train it again") from None
    return tensors, meta or {}


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike,
               strict: bool = True) -> None:
    """``module.load_state_dict(state)`` after checking names, shapes and dtypes (floating weights stay
    floating), with a one-line error naming the first mismatch and the fix."""
    own = module.state_dict()
    fix = "use weights saved from the same architecture and config"
    if strict:
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise InputError(f"{source} does not match the model: missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}; {fix}")
    for name, value in state.items():
        if name not in own:
            continue
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(own[name].shape):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise InputError(f"{source} does not match the model: {name} has shape {got}, the model needs "
                             f"{tuple(own[name].shape)}; {fix}")
        if own[name].is_floating_point() != value.is_floating_point():
            raise InputError(f"{source} does not match the model: {name} is {value.dtype}, the model needs "
                             f"{own[name].dtype}; {fix}")
    module.load_state_dict(state, strict=strict)


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
        _counted_write(f, text, Path(path))
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


def changed_settings(saved: dict, now: dict, may_change: tuple[str, ...], defaults: dict | None = None) -> list[str]:
    """Keys of ``now`` whose values differ from a checkpoint's ``saved`` config, except ``may_change``. A key the
    saved config lacks (a setting added after it was written) counts as its value in ``defaults``."""
    defaults = defaults or {}
    return sorted(k for k in now if k not in may_change and saved.get(k, defaults.get(k)) != now[k])


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
