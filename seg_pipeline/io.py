"""File writes that never leave half a file, content hashes, and JSON: one implementation for the package.

Every writer in the package publishes through this module, so one temp-name scheme holds everywhere:
``.<name>.tmp-<pid>-<token><suffix>`` for files and ``.<name>.tmp-<pid>-<token>`` for folders, in the
destination's own folder (same filesystem, so ``os.replace`` is atomic). The leading dot hides temps
from globs such as ``*.tif``; the suffix is kept because GDAL and matplotlib choose formats from it;
the pid lets :func:`sweep_stale_temps` tell a killed writer's leftovers from a live writer's work, so
two processes writing into one folder never delete each other's temps.

Temps are created with ``open(..., "x")``/``mkdir`` rather than ``tempfile.mkstemp`` (always 0600):
published files and folders then get the usual ``0666 & ~umask`` mode, readable by QGIS under
another account or by an MLflow server.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Temps older than this are removed even when their pid looks alive (pids are reused, and a pid
#: from another machine sharing the folder means nothing here).
STALE_AFTER_S = 24 * 3600
_TEMP_NAME = re.compile(r"^\..+\.(tmp|old)-(\d+)-[0-9a-f]{8}")
_CHUNK = 1 << 20


def temp_name(final: Path, kind: str = "tmp", keep_suffix: bool = True) -> Path:
    """A fresh hidden name next to ``final`` (``kind`` is ``tmp`` for new content, ``old`` for retired)."""
    suffix = final.suffix if keep_suffix else ""
    return final.with_name(f".{final.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(final_path: str | os.PathLike[str], keep_suffix: bool = True) -> Iterator[Path]:
    """Yield a temp path (not yet created) to write; rename onto ``final_path`` only on success.

    ``keep_suffix=False`` for files whose writer does not need the extension (checkpoints), so a
    glob such as ``*.pt`` never sees the temp. Sidecars GDAL may write next to the temp file
    (``.aux.xml``, ``.msk``) are removed too.
    """
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final, keep_suffix=keep_suffix)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        for leftover in (tmp, Path(f"{tmp}.aux.xml"), Path(f"{tmp}.msk")):
            leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(final_path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a new temp folder; on success it replaces ``final_path`` (an old folder is retired first).

    A reader sees the old folder or the new one, never a mix: the old one is renamed aside, the new
    one renamed into place, then the old one deleted. On failure the old folder stays.
    """
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_name(final, keep_suffix=False)
    staging.mkdir()
    try:
        yield staging
        retired = None
        if final.exists():
            retired = temp_name(final, "old", keep_suffix=False)
            os.replace(final, retired)
        try:
            os.replace(staging, final)
        except BaseException:
            if retired is not None:
                os.replace(retired, final)
            raise
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def folder_lock(folder: Path | str, what: str, log_fn: Any = None) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (``fcntl.flock`` of ``.<name>.lock`` beside it, so a failed
    step leaves no empty folder behind) while writing into it.

    Two ingests of one dataset (two ``dagster job execute``, which bypass the run queue's per-dataset
    limit) would rewrite the same shard folders and sweep each other's temps; the second now waits.
    The lock dies with its process, so a killed run never leaves the folder locked.
    """
    import fcntl

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if log_fn is not None:
                log_fn(f"{what}: another process is writing {folder}; waiting for it to finish")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def is_temp(path: Path) -> bool:
    """Whether ``path`` is a temp (or retired) name of this module's scheme."""
    return _TEMP_NAME.match(path.name) is not None


def sweep_stale_temps(folder: Path | str, now: float | None = None) -> list[Path]:
    """Delete the temps that dead writers left in ``folder`` (not recursive); return what was removed.

    A temp is stale when its writer's pid is gone, or when it is older than :data:`STALE_AFTER_S`.
    Temps of live writers, this process's own included, are left alone.
    """
    directory = Path(folder)
    if not directory.is_dir():
        return []
    now = time.time() if now is None else now
    removed = []
    for path in directory.iterdir():
        match = _TEMP_NAME.match(path.name)
        if match is None:
            continue
        pid = int(match.group(2))
        try:
            age = now - path.lstat().st_mtime
        except FileNotFoundError:
            continue
        dead = pid != os.getpid() and not _pid_alive(pid)
        if dead or age > STALE_AFTER_S:
            _remove(path)
            removed.append(path)
    return removed


def write_bytes(path: Path | str, data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (``fsync`` for files that must survive a power cut)."""
    path = Path(path)
    with atomic_write(path) as tmp, open(tmp, "xb") as handle:
        handle.write(data)
        if fsync:
            handle.flush()
            os.fsync(handle.fileno())
    return path


def write_text(path: Path | str, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def to_json(payload: Any) -> str:
    """Stable JSON text: sorted keys, two-space indent, a final newline; paths as strings."""
    return json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"


def write_json(path: Path | str, payload: Any) -> Path:
    """Write ``payload`` as stable JSON (see :func:`to_json`) to ``path`` atomically."""
    return write_text(path, to_json(payload))


def read_json(path: Path | str) -> Any:
    """Load a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def file_sha256(path: Path | str) -> str:
    """Content hash of a file, streamed so big rasters never load into memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def text_sha256(text: str) -> str:
    """Hash of a string (UTF-8)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
