"""The registry of active manifests: the ``manifests:`` list of params.yaml, edited in place.

params.yaml is written by people (comments, alignment, order), so the list is edited as text: only
the one item line is inserted or removed, and the result is re-read to check that nothing else
changed. Supported forms: a block list (``manifests:`` then ``  - name`` lines, comments allowed
between them), a flow list (``manifests: [a, b]``), an empty value, or no key at all.

Every change holds an exclusive lock (``fcntl.flock`` on ``.params.yaml.lock`` beside the file),
re-reads the file under it and replaces it atomically, so concurrent `add`/`revert` lose nothing. A
lock held by another process is waited for, at most ``wait`` seconds (``on_wait`` is told once, so the
user knows why nothing happens). A params file that is a symbolic link is written through the link:
its target is replaced atomically and the link stays.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from pathlib import Path
from typing import Callable, Iterator

import yaml

from .. import safeyaml
from ..io import write_text_atomic
from .names import BadName, check_name as _check
from ..params import ConfigError, load_params, parse_params

_KEY = re.compile(r"^manifests[ \t]*:(?P<value>.*)$")
_ITEM = re.compile(r"^(?P<indent>[ \t]*)-[ \t]+(?P<item>.*?)[ \t]*$")
_SKIP = re.compile(r"^[ \t]*(#.*)?$")  # blank or comment-only line


def check_name(name: str, where: str) -> None:
    """names.check_name, with the file or field it came from in the message."""
    try:
        _check(name)
    except BadName as e:
        raise ConfigError(f"{where}: {e}") from None


WAIT = 60.0  # seconds add/revert wait for another one's lock by default (their --wait)


def _target(params: Path) -> Path:
    """The file a params path names: a symbolic link's target (written through the link), else itself."""
    return Path(os.path.realpath(params)) if params.is_symlink() else params


@contextlib.contextmanager
def params_lock(params: Path, wait: float = WAIT, on_wait: Callable[[Path], None] | None = None) -> Iterator[None]:
    """An exclusive lock on params.yaml's registry (a lock file beside the file), released on exit.
    Held by another process: ``on_wait(lock)``, then retried until ``wait`` seconds have passed."""
    lock = _target(params).parent / f".{_target(params).name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        give_up = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= give_up:
                    raise ConfigError(f"{params}: manifests: another romeflow add/revert held the lock {lock.name} "
                                      f"for {wait:g} s (--wait); try again") from None
                if on_wait is not None:
                    on_wait(lock)
                    on_wait = None
                time.sleep(min(0.05, wait))
        yield
    finally:
        os.close(fd)  # closing releases the lock


def read_manifests(params: Path) -> list[str]:
    """The active manifest names, in order ([] when the key is missing or empty)."""
    return list(load_params(params, resolve_auto=False).manifests)


def _load(params: Path, text: str) -> dict:
    try:
        data = safeyaml.loads(text, params)
    except safeyaml.YamlError as e:
        raise ConfigError(str(e)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{params}: (top level): must be a mapping of sections")
    return data


def _scalar(name: str) -> str:
    """``name`` as a YAML scalar that reads back as the same string (quoted if it would not, e.g. '123')."""
    return name if yaml.safe_load(name) == name else f"'{name}'"


def _flow(names: list[str]) -> str:
    return "[" + ", ".join(_scalar(n) for n in names) + "]"


def edit_manifest_list(text: str, add: str | None = None, remove: str | None = None) -> str:
    """``text`` (a params file) with one name appended to or removed from ``manifests:``.

    Only the affected line changes. Raises ValueError for a layout this editor does not handle.
    """
    lines = text.splitlines(keepends=True)
    key = next((i for i, line in enumerate(lines) if _KEY.match(line.rstrip("\r\n"))), None)
    if key is None:
        if remove is not None:
            raise ValueError("no manifests: list")
        sep = "" if not text or text.endswith("\n") else "\n"
        return text + sep + f"manifests:\n  - {_scalar(add)}\n"
    value = _KEY.match(lines[key].rstrip("\r\n"))["value"]
    end = "\n" if lines[key].endswith("\n") else ""
    inline = yaml.safe_load(value) if value.strip() and not value.strip().startswith("#") else None
    if inline is not None or value.strip().startswith("["):  # a flow list on the key's line
        names = list(inline or [])
        names = names + [add] if add is not None else [n for n in names if n != remove]
        comment = value[value.index("]") + 1:] if "]" in value else ""
        lines[key] = f"manifests: {_flow(names)}{comment}{end}"
        return "".join(lines)
    items = []  # (line index, indent, name) of the block list's item lines
    for i in range(key + 1, len(lines)):
        line = lines[i].rstrip("\r\n")
        if _SKIP.match(line):
            continue
        m = _ITEM.match(line)
        if not m or (items and m["indent"] != items[0][1]):
            break  # the next key: the list ended
        items.append((i, m["indent"], yaml.safe_load(m["item"])))
    if add is not None:
        at, indent = (items[-1][0] + 1, items[-1][1]) if items else (key + 1, "  ")
        if at == len(lines) and lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines.insert(at, f"{indent}- {_scalar(add)}\n")
    else:
        lines = [line for i, line in enumerate(lines) if not any(i == j and n == remove for j, _, n in items)]
        if all(n == remove for _, _, n in items):  # the list is now empty: say so, or it would read as null
            comment = value[value.index("#"):] if "#" in value else ""
            lines[key] = f"manifests: []{'  ' + comment if comment else ''}{end}"
    return "".join(lines)


def _write_list(params: Path, add: str | None = None, remove: str | None = None) -> None:
    """Under the lock: re-read, check (the file as it is now), edit one line, check again, replace (the
    link's target, for a params file that is a symbolic link)."""
    try:
        text = safeyaml.read_bytes(params, "params file").decode("utf-8") if params.exists() else ""
    except (safeyaml.YamlError, UnicodeDecodeError) as e:
        raise ConfigError(str(e) if isinstance(e, safeyaml.YamlError) else f"{params}: not UTF-8 text") from None
    before = _load(params, text)
    parse_params(before, str(params), resolve_auto=False)
    names = list(before.get("manifests") or [])
    if add is not None and add in names:
        raise ConfigError(f"{params}: manifests: '{add}' is already registered")
    if remove is not None and remove not in names:
        raise ConfigError(f"{params}: manifests: '{remove}' is not registered")
    want = names + [add] if add is not None else [n for n in names if n != remove]
    try:
        new = edit_manifest_list(text, add, remove)
        after = _load(params, new)
    except (ValueError, ConfigError):
        after = None
    if after is None or after.get("manifests") != want or {**before, "manifests": want} != after:
        raise ConfigError(f"{params}: manifests: cannot edit this list without touching the rest of the file; "
                          f"edit it by hand")
    write_text_atomic(_target(params), new)


def register(params: Path, name: str, wait: float = WAIT, on_wait: Callable[[Path], None] | None = None) -> None:
    """Append ``name`` to params.yaml ``manifests:``; error if it is there already."""
    check_name(name, f"{params}: manifests")
    if params.exists() and name in read_manifests(params):  # refused before the lock file is made
        raise ConfigError(f"{params}: manifests: '{name}' is already registered")
    with params_lock(params, wait, on_wait):
        _write_list(params, add=name)


def unregister(params: Path, name: str, then=None, wait: float = WAIT,
               on_wait: Callable[[Path], None] | None = None) -> None:
    """Remove ``name`` from params.yaml ``manifests:`` (error if it is not there); ``then()``, if given,
    runs under the same lock (revert deletes the manifest's artifacts there)."""
    check_name(name, f"{params}: manifests")
    if not params.exists() or name not in read_manifests(params):  # refused before the lock file is made
        raise ConfigError(f"{params}: manifests: '{name}' is not registered")
    with params_lock(params, wait, on_wait):
        _write_list(params, remove=name)
        if then is not None:
            then()
