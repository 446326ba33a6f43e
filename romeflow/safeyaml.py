"""The one YAML reader of romeflow (manifests and params.yaml): plain data, bounded, unambiguous.

On top of PyYAML's safe loader it refuses what could make a small file mean something large or two
things at once: anchors and aliases (an "alias bomb" of a few hundred bytes expands to gigabytes),
merge keys (``<<``), duplicate keys (the second ``rome:`` section would silently win), files over
``MAX_FILE_BYTES``, strings over ``MAX_STRING``, keys over ``MAX_KEY``, nesting deeper than
``MAX_DEPTH``, more than ``MAX_NODES`` values and numbers written with more than ``MAX_NUMBER``
characters (Python refuses to convert an integer of over 4,300 digits, without saying where). It is checked on the node tree before anything is
constructed, so refusing costs no more than reading the file once.

Floats are read as YAML 1.2 (and DVC) read them: ``1e-3`` is a number, not the string PyYAML 1.1 makes.
Every problem is one line: ``FILE: FIELD: what``.
"""

from __future__ import annotations

import os
import re

import yaml

from .io import check_input

MAX_FILE_BYTES = 1 << 20  # 1 MiB
MAX_STRING = 10_000  # characters in any one string (fields have tighter limits in their schemas)
MAX_KEY = 200  # characters in a mapping key
MAX_DEPTH = 32  # nested mappings / lists
MAX_NODES = 100_000  # values in one document
MAX_NUMBER = 100  # characters in a number (an int or a float as YAML resolves it)
_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


class YamlError(ValueError):
    """A YAML file romeflow refuses; str(error) is the one-line message."""


class _Refused(Exception):
    def __init__(self, path: list, what: str):
        self.path, self.what = path, what


def _line(node_or_event) -> str:
    return f"line {node_or_event.start_mark.line + 1}"


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses anchors, aliases, merge keys, duplicate keys and oversized documents while
    composing (so nothing is ever expanded), and reads YAML 1.2 floats (``1e-3``, ``1E+5``)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._path: list = []  # the field being composed
        self._nodes = 0

    def compose_node(self, parent, index):
        part = None if parent is None or index is None else (index.value if isinstance(index, yaml.Node) else index)
        here = self._path + ([] if part is None else [part])
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(here, f"aliases (*{event.anchor}) are not allowed ({_line(event)})")
        if event.anchor is not None:
            raise _Refused(here, f"anchors (&{event.anchor}) are not allowed ({_line(event)})")
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _Refused(here, f"more than {MAX_NODES} values in the file")
        if len(here) > MAX_DEPTH:
            raise _Refused(here, f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(event, yaml.ScalarEvent) and len(event.value) > MAX_STRING:
            what = "key" if parent is not None and index is None else "value"
            raise _Refused(here, f"{what} is {len(event.value)} characters long, more than the {MAX_STRING} allowed")
        if isinstance(event, yaml.ScalarEvent) and len(event.value) > MAX_NUMBER and self._is_number(event):
            raise _Refused(here, f"a number of {len(event.value)} characters, more than the {MAX_NUMBER} allowed")
        self._path = here
        try:
            node = super().compose_node(parent, index)
        finally:
            self._path = here[:len(here) - (part is not None)]
        if isinstance(node, yaml.MappingNode):
            self._check_keys(node, here)
        return node

    def _is_number(self, event: yaml.ScalarEvent) -> bool:
        """Whether the scalar would be constructed as an int or a float (plain, or tagged !!int/!!float)."""
        tag = event.tag if event.tag not in (None, "!") else self.resolve(yaml.ScalarNode, event.value, event.implicit)
        return tag in _NUMBER_TAGS

    @staticmethod
    def _check_keys(node: yaml.MappingNode, here: list) -> None:
        seen: dict[str, yaml.Node] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode):
                raise _Refused(here, f"the key at {_line(key)} is not a plain value")
            if key.tag == "tag:yaml.org,2002:merge":
                raise _Refused(here + [key.value], f"merge keys are not allowed ({_line(key)})")
            if len(key.value) > MAX_KEY:
                raise _Refused(here, f"the key at {_line(key)} is longer than {MAX_KEY} characters")
            if key.value in seen:
                raise _Refused(here + [key.value], f"duplicate key ({_line(seen[key.value])} and {_line(key)})")
            seen[key.value] = key


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _where(path: list) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def loads(text: str | bytes, name: str | os.PathLike) -> object:
    """Parse ``text`` (the content of the file ``name``, for messages) into plain Python data."""
    size = len(text.encode() if isinstance(text, str) else text)
    if size > MAX_FILE_BYTES:
        raise YamlError(f"{name}: (top level): file is {size} bytes, more than the {MAX_FILE_BYTES} allowed")
    loader = None
    try:
        loader = _Loader(text)  # reading the first chunk may already fail (not UTF-8)
        node = loader.get_single_node()
        return None if node is None else loader.construct_document(node)
    except _Refused as e:
        raise YamlError(f"{name}: {_where(e.path)}: {e.what}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise YamlError(f"{name}: invalid YAML{at}: {problem}") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_bytes(path: str | os.PathLike, what: str = "file") -> bytes:
    """The file's bytes, refusing (without reading them all) a file over MAX_FILE_BYTES."""
    path = check_input(path, what, YamlError)  # a FIFO would block open()
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise YamlError(f"{path}: cannot read {what} ({e.strerror})") from None
    if len(data) > MAX_FILE_BYTES:
        raise YamlError(f"{path}: (top level): file is larger than the {MAX_FILE_BYTES} bytes allowed")
    return data


def load(path: str | os.PathLike, what: str = "file") -> object:
    """Read and parse a YAML file with the limits above."""
    return loads(read_bytes(path, what), path)
