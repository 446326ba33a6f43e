"""The other subjects an edit touches: those it holds by construction, and those it may move.

A report must not grade its own constraints. Two kinds of other subjects are kept apart:

    held_subjects   per edit, the subjects whose keys its insert held fixed: the manifest's ``protect:``
                    list, and what the delta's metadata records (``edits[i].protected``: subjects that
                    ``rome.protect`` mined, and, in deltas written before neighbours stopped being
                    constraints, the subjects of same-relation neighbours). A neighbour prompt that
                    mentions one of them is held by construction: listed apart, never scored.
    TokenSharing    up to k reference names (``rome.protect_sources``) that share the edited subject's
                    last token, asked the edit's own relation. Whether each kept the unedited model's
                    top-1 token is NS_tok for any manifest, without ground truth: "what else moved".

The mined names are chosen deterministically: the held ones, the subject itself and the manifest's own
neighbours' subjects are left out, the rest ordered by sha256(subject + name) (a seeded shuffle that
does not depend on the reference list's order), and the first k asked.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from ..engine.protect import NameIndex
from ..pipeline.manifests import subject_of


@dataclass(frozen=True)
class Bystanders:
    """Per edit of one manifest: the subjects held by construction and the mined token-sharing ones."""

    held: tuple[tuple[str, ...], ...]
    mined: tuple[tuple[str, ...], ...]

    @classmethod
    def of(cls, manifest, deltas=(), sharing: "TokenSharing | None" = None, tokenizer=None) -> "Bystanders":
        """What ``deltas`` (and the manifest's ``protect:`` lists) held, and, with ``sharing``, the names
        mined for each edit (``tokenizer``: the model's, which decides what shares a last token)."""
        held = held_subjects(manifest, deltas)
        if sharing is None or sharing.k == 0:
            return cls(held, tuple(() for _ in manifest.edits))
        return cls(held, sharing.mine(tokenizer, manifest, held))


def held_subjects(manifest, deltas=()) -> tuple[tuple[str, ...], ...]:
    """Per edit: its ``protect:`` list, then the subjects that a delta's metadata says the insert of the
    same edit (same subject and relation in the delta's canonical manifest) held fixed."""
    recorded: dict[tuple[str, str], list[str]] = {}
    for d in deltas:
        canonical = d.meta["manifest"]["canonical"].get("edits")
        if not isinstance(canonical, list):
            continue
        for ce, me in zip(canonical, d.meta["edits"]):
            if isinstance(ce, dict):
                recorded.setdefault((ce.get("subject"), ce.get("relation")), []).extend(me.get("protected", []))
    return tuple(tuple(s for s in dict.fromkeys([*e.protect, *recorded.get((e.subject, e.relation), [])])
                       if s != e.subject)
                 for e in manifest.edits)


def mentions_held(prompt: str, held: tuple[str, ...]) -> bool:
    """A neighbour prompt that names a held subject: its key there is held, so its answer is by construction."""
    return any(s in prompt for s in held)


@dataclass
class TokenSharing:
    """Up to ``k`` reference names per edit that share the edited subject's last token."""

    names: list[str]  # reference entity names (protect.reference_names of rome.protect_sources)
    k: int  # params.yaml eval.token_neighbors
    _index: tuple | None = field(default=None, repr=False)  # (tokenizer, its NameIndex), built once

    def index(self, tokenizer) -> NameIndex:
        if self._index is None or self._index[0] is not tokenizer:
            self._index = (tokenizer, NameIndex(tokenizer, self.names))
        return self._index[1]

    def mine(self, tokenizer, manifest, held: tuple[tuple[str, ...], ...]) -> tuple[tuple[str, ...], ...]:
        """Per edit: the names asked (module docstring for the choice)."""
        index, out = self.index(tokenizer), []
        for e, h in zip(manifest.edits, held):
            asked = {subject_of(e.relation, n.prompt) for n in e.neighbors}
            pool = [n for n in index.sharing(tokenizer, e.subject) if n not in h and n not in asked and n != e.subject]
            pool.sort(key=lambda n: hashlib.sha256(f"{e.subject}\n{n}".encode()).digest())
            out.append(tuple(pool[:self.k]))
        return tuple(out)
