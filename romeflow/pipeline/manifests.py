"""Edit manifests: YAML files of (subject, relation, target), validated by schemas/manifest.schema.json.

Every problem is reported as one line naming the file, the edit and the field, e.g.
``edits/x.yaml: edits[2].target: must not be empty``.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .. import safeyaml
from ..engine.rome import EditRequest
from ..schemas import validate


class ManifestError(ValueError):
    """An invalid manifest; str(error) is the one-line message for the user."""


@dataclass(frozen=True)
class Neighbor:
    prompt: str
    answer: str | None = None  # None: "whatever the unedited model says now"


@dataclass(frozen=True)
class ManifestEdit:
    subject: str
    relation: str
    target: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighbors: tuple[Neighbor, ...] = ()
    layer: int | str | None = None  # an index, "auto" (the traced layer) or None (the default)
    protect: tuple[str, ...] = ()  # other subjects whose keys the insert holds fixed (the only ones)

    @property
    def request(self) -> EditRequest:
        """What the editor gets: only the ``protect:`` list holds keys. Neighbours are test data, never
        constraints: a neighbour held fixed would score NS by construction."""
        return EditRequest(self.subject, self.relation, self.target, self.target_true, self.protect)

    @property
    def prompt(self) -> str:
        return self.request.prompt

    def canonical(self) -> dict:
        d = asdict(self)
        d["paraphrases"] = list(self.paraphrases)
        d["neighbors"] = [asdict(n) for n in self.neighbors]
        if self.protect:
            d["protect"] = list(self.protect)
        else:  # manifests without protect: keep the canonical form (and so provenance) of older deltas
            del d["protect"]
        return d


def subject_of(relation: str, prompt: str) -> str | None:
    """The subject of a prompt asked with this relation template ("{}'s area of work is"), if it is one."""
    head, tail = relation.split("{}", 1)
    if len(prompt) > len(head) + len(tail) and prompt.startswith(head) and prompt.endswith(tail):
        subject = prompt[len(head):len(prompt) - len(tail)].strip()
        return subject or None
    return None


@dataclass(frozen=True)
class Manifest:
    path: str
    name: str  # file stem: the manifest's name in params.yaml, deltas/ and reports/
    sha256: str  # of the file's bytes
    edits: tuple[ManifestEdit, ...]
    model: str | None = None
    layer: int | str | None = None  # an index, "auto" (the traced layer) or None (the default)
    description: str = ""

    def layer_of(self, edit: ManifestEdit, default: int) -> int:
        layer = next(l for l in (edit.layer, self.layer, default) if l is not None)
        if layer == "auto":
            raise ManifestError(f"{self.path}: layer: auto is not resolved here; it needs the traced layer "
                                f"(reports/trace/layer.json from `dvc repro trace`)")
        return layer

    @property
    def uses_auto(self) -> bool:
        return self.layer == "auto" or any(e.layer == "auto" for e in self.edits)

    def with_auto_layer(self, layer: int) -> "Manifest":
        """The same manifest with every ``layer: auto`` replaced by ``layer`` (the traced layer)."""
        pick = lambda l: layer if l == "auto" else l  # noqa: E731
        return replace(self, layer=pick(self.layer), edits=tuple(replace(e, layer=pick(e.layer)) for e in self.edits))

    def canonical(self) -> dict:
        """What the manifest means, independent of its formatting."""
        return {"model": self.model, "layer": self.layer, "edits": [e.canonical() for e in self.edits]}


def _fail(path, where: str, what: str):
    raise ManifestError(f"{path}: {where}: {what}")


def load_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    try:  # bounded: size, string lengths, no aliases or duplicate keys (romeflow.safeyaml)
        raw = safeyaml.read_bytes(path, "manifest")
        data = safeyaml.loads(raw, path)
    except safeyaml.YamlError as e:
        raise ManifestError(str(e)) from None
    if data is None:
        _fail(path, "(top level)", "the manifest is empty")
    errors = validate("manifest", data)
    if errors:
        _fail(path, *errors[0])
    edits = []
    seen: dict[tuple[str, str], int] = {}
    for i, e in enumerate(data["edits"]):
        where = f"edits[{i}]"
        subject, relation = e["subject"].strip(), e["relation"]
        if relation.count("{}") != 1:
            _fail(path, f"{where}.relation", "must contain {} exactly once")
        for j, para in enumerate(e.get("paraphrases", [])):
            if subject not in para:
                _fail(path, f"{where}.paraphrases[{j}]", f"subject '{subject}' not found in the prompt")
        if e.get("target_true") is not None and e["target_true"].strip() == e["target"].strip():
            _fail(path, f"{where}.target", "is the same as target_true")
        key = (subject, relation)
        if key in seen:
            first = data["edits"][seen[key]]
            if first["target"].strip() == e["target"].strip():
                _fail(path, where, f"duplicate of edits[{seen[key]}]")
            _fail(path, f"{where}.target", f"conflicts with edits[{seen[key]}] "
                  f"('{first['target']}' vs '{e['target']}' for the same subject and relation)")
        seen[key] = i
        neighbors = tuple(Neighbor(n) if isinstance(n, str) else Neighbor(n["prompt"], n.get("answer"))
                          for n in e.get("neighbors", []))
        protect = tuple(dict.fromkeys(p.strip() for p in e.get("protect", [])))
        if subject in protect:
            _fail(path, f"{where}.protect", f"lists the edited subject '{subject}' itself")
        edits.append(ManifestEdit(subject, relation, e["target"].strip(),
                                  e["target_true"].strip() if e.get("target_true") else None,
                                  tuple(e.get("paraphrases", [])), neighbors, e.get("layer"), protect))
    return Manifest(str(path), path.stem, hashlib.sha256(raw).hexdigest(), tuple(edits),
                    data.get("model"), data.get("layer"), data.get("description", ""))


def check_conflicts(manifests: list[Manifest]) -> None:
    """Refuse manifests that rewrite the same fact differently: an edit of the same subject and relation
    as an edit of an earlier manifest, with another target. One line naming both files (ManifestError)."""
    seen: dict[tuple[str, str], tuple[Manifest, int]] = {}
    for m in manifests:
        for i, e in enumerate(m.edits):
            key = (e.subject, e.relation)
            if key in seen and seen[key][0].path != m.path:
                first, j = seen[key]
                other = first.edits[j]
                if other.target != e.target:
                    raise ManifestError(f"{m.path}: edits[{i}].target: conflicts with {first.path} edits[{j}] "
                                        f"('{e.target}' vs '{other.target}' for '{e.subject}' and relation "
                                        f"'{e.relation}'); revert one of them")
            seen.setdefault(key, (m, i))
