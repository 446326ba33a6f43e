"""Writes: every artifact appears whole or not at all, with normal permissions, and no temp file outlives
its run.

A file (or, for `romeflow export`, a folder) is written under a temporary name beside its target,
``.romeflow-tmp-<pid>-<name>.<random>``, and renamed onto the target only when complete. On failure
the temporary is removed; after a kill -9 it is left behind, and the next write in that folder removes
it (only when the process that made it is gone, so concurrent runs never delete each other's work).
``check_outputs`` (``check_writable`` for each output) lets a command find an unwritable output before it
computes anything: a folder where a file goes, a device, FIFO or socket (never replaced), an output that
is also one of the command's inputs or another of its outputs. ``check_input`` refuses an input that is
not a regular file before it is opened (opening a FIFO blocks). A write that fails (a full disk, a
file-size limit) is one OutputError line naming the output.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from safetensors import SafetensorError

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


DANGLING = "a symbolic link to a missing file"
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def not_regular(path: str | os.PathLike) -> str | None:
    """What ``path`` is, in words, when something is there but not a regular file (links followed):
    'a FIFO (named pipe)', 'a symbolic link loop', ...; None for a regular file or for nothing at all.
    Never opens it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return DANGLING if os.path.islink(path) else None
    except OSError as e:
        return "a symbolic link loop" if e.errno == errno.ELOOP else None  # else: the caller's open() says
    return next((words for test, words in _KINDS if test(mode)), None if stat.S_ISREG(mode) else "not a regular file")


def check_input(path: str | os.PathLike, what: str, error: type[Exception] = ValueError) -> Path:
    """Refuse (``error``, one line) an input that is there but is not a regular file, before it is opened:
    a FIFO (reading it would block), a socket, a device, a folder, a symbolic-link loop or a dangling
    link. A missing file is left to the caller's own message."""
    kind = not_regular(path)
    if kind is not None:
        raise error(f"{path}: {what} is {kind}, not a regular file")
    return Path(path)


def _refuse_special(path: Path, where: str) -> None:
    """An existing output that is a device, FIFO, socket or link loop is never replaced by a file."""
    kind = not_regular(path)
    if kind not in (None, DANGLING, "a folder"):
        raise OutputError(f"{where}: is {kind}, not a regular file; refusing to replace it")


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (links and hard links followed; a missing file by its path)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_outputs(outputs: Iterable[tuple], inputs: Iterable[tuple] = ()) -> None:
    """``check_writable`` of each output, ``(path, option)`` or ``(path, option, folder)`` (None paths are
    skipped); then refuse an output that is one of the ``inputs``, ``(path, what)`` pairs such as
    ``('edits/x.yaml', 'the manifest edits/x.yaml')``, or another of the outputs: writing it would
    destroy what the command reads, or what it wrote a moment before."""
    inputs = [(p, what) for p, what in inputs if p is not None]
    seen: list[tuple] = []
    for path, option, *folder in outputs:
        if path is None:
            continue
        check_writable(path, option, bool(folder and folder[0]))
        for p, what in inputs:
            if same_file(path, p):
                raise OutputError(f"{option} {path}: is also an input ({what}); choose another path")
        for p, other in seen:
            if same_file(path, p):
                raise OutputError(f"{option} {path}: is also {other} {p}; choose another path")
        seen.append((path, option))


def check_writable(path: str | os.PathLike, option: str = "output", folder: bool = False) -> None:
    """Refuse (OutputError) an output path that cannot be written, before anything is computed:
    a folder where a file goes (or the reverse), a device, FIFO or socket, or no permission to create it."""
    path = Path(path)
    if path.is_dir() and not folder:
        raise OutputError(f"{option} {path}: is a folder, not a file")
    if not folder:
        _refuse_special(path, f"{option} {path}")
    if path.exists() and not path.is_dir() and folder:
        raise OutputError(f"{option} {path}: is a file, not a folder")
    parent = path.parent if not (folder and path.is_dir()) else path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{option} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {path}: cannot write in {parent} (permission denied)")


def json_number_problem(e: ValueError) -> str:
    """json.loads' ValueError for an integer longer than Python converts, in words (else its first line)."""
    if "integer string conversion" in str(e):
        return f"a number of more than {sys.get_int_max_str_digits()} digits"
    return (str(e).splitlines() or [type(e).__name__])[0]


def _reason(e: Exception) -> str:
    """Why a write failed, in a few words: 'No space left on device', 'File too large', ..."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    code = re.search(r"\(os error (\d+)\)", str(e))  # safetensors: "I/O error: File too large (os error 27)"
    return os.strerror(int(code[1])) if code else (str(e).splitlines() or [type(e).__name__])[0]


_WRITE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS)  # full disk, size limit, quota, read-only


@contextlib.contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    """A write that failed for want of room (an OSError, or safetensors' SafetensorError around one) as
    one OutputError line naming the output; other errors pass unchanged."""
    try:
        yield
    except OSError as e:
        if e.errno not in _WRITE_ERRNOS:
            raise
        raise OutputError(f"{path}: cannot write ({_reason(e)})") from e
    except SafetensorError as e:
        raise OutputError(f"{path}: cannot write ({_reason(e)})") from e


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    _refuse_special(path, str(path))
    with _write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_temp(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=_prefix(path), dir=path.parent)
        os.close(fd)
    try:
        with _write_errors(path):
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
    with _write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_temp(path.parent)
        tmp = Path(tempfile.mkdtemp(prefix=_prefix(path), dir=path.parent))
    try:
        with _write_errors(path):
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
