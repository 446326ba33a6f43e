"""Writes: every artifact appears whole or not at all, with normal permissions, and no temp file outlives
its run.

A file (or, for `romeflow export`, a folder) is written under a temporary name beside its target,
``.romeflow-tmp-<pid>-<name>.<random>``, and renamed onto the target only when complete. On failure
the temporary is removed; after a kill -9 it is left behind, and the next write in that folder removes
it (only when the process that made it is gone, so concurrent runs never delete each other's work).
``check_writable`` lets a command find an unwritable output before it computes anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

TMP_PREFIX = ".romeflow-tmp"


class OutputError(ValueError):
    """An output that cannot be written; str(error) is the one-line message."""


def _mode(mode: int) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_temp(folder: str | os.PathLike) -> list[Path]:
    """Remove the leftovers of interrupted writes in ``folder`` (temporaries of processes that are gone)."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.glob(f"{TMP_PREFIX}-*"):
        pid = entry.name[len(TMP_PREFIX) + 1:].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue  # a running process's (this one's included): still in use
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _prefix(path: Path) -> str:
    return f"{TMP_PREFIX}-{os.getpid()}-{path.name}."


def check_writable(path: str | os.PathLike, option: str = "output", folder: bool = False) -> None:
    """Refuse (OutputError) an output path that cannot be written, before anything is computed:
    a folder where a file goes (or the reverse), or no permission to create it."""
    path = Path(path)
    if path.is_dir() and not folder:
        raise OutputError(f"{option} {path}: is a folder, not a file")
    if path.exists() and not path.is_dir() and folder:
        raise OutputError(f"{option} {path}: is a file, not a folder")
    parent = path.parent if not (folder and path.is_dir()) else path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{option} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {path}: cannot write in {parent} (permission denied)")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_temp(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path), dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _mode(0o666))  # mkstemp (and safetensors) make 0600; the usual permissions: 0644
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` (which must not exist); rename it onto ``path`` only if
    the block succeeds. Files get 0644, folders 0755 (less the umask)."""
    path = Path(path)
    if path.exists():
        raise OutputError(f"{path}: already exists; choose a new folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_temp(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path), dir=path.parent))
    try:
        yield tmp
        for root, dirs, files in os.walk(tmp):
            os.chmod(root, _mode(0o777))
            for f in files:
                os.chmod(os.path.join(root, f), _mode(0o666))
        if path.exists():  # appeared meanwhile: never merge into or replace someone else's folder
            raise OutputError(f"{path}: already exists; choose a new folder")
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
