"""Manifest names: the one check every name passes before it becomes a path or a DVC stage key.

A name is what ``edits/NAME.yaml``, ``deltas/NAME.safetensors`` and ``reports/NAME.json`` are built
from, and the key of the ``edit@NAME`` / ``eval@NAME`` stages: letters, digits, '_' and '-', at most
``MAX_LENGTH`` characters. So no '/', no '.', no '..', nothing hidden, nothing outside the project.
"""

from __future__ import annotations

import re

NAME = re.compile(r"^[A-Za-z0-9_-]+$")
MAX_LENGTH = 100
RESERVED = {"stack", "plots"}  # reports/stack.json and reports/plots/ belong to the stack stage


class BadName(ValueError):
    """Not a plain manifest name; str(error) says why (the caller adds the file and field)."""


def check_name(name) -> str:
    """``name`` if it is a plain manifest name, else BadName."""
    if not isinstance(name, str):
        raise BadName(f"manifest name {name!r} must be a string")
    shown = name if len(name) <= 60 else name[:57] + "..."
    if not NAME.match(name):
        raise BadName(f"manifest name {shown!r} may only contain letters, digits, '_' and '-'")
    if len(name) > MAX_LENGTH:
        raise BadName(f"manifest name {shown!r} is longer than {MAX_LENGTH} characters")
    if name in RESERVED:
        raise BadName(f"manifest name {name!r} is reserved for the stack stage's reports")
    return name


def stage_name(name: str) -> str:
    """check_name for the DVC stage scripts: a bad name ends the stage with one line, not a traceback."""
    try:
        return check_name(name)
    except BadName as e:
        raise SystemExit(f"Error: {e}") from None
