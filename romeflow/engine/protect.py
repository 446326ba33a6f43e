"""Protected keys: the other subjects an edit must leave alone (entity-level specificity).

An edit of "Stanford University" writes a new value for the key at its last token, " University".
Early in the network that key is mostly the token's own, so other "X University" subjects have keys
close to it and the rank-one update moves them too. ROME's Eq. 2 can hold any set of keys fixed
(``rome.insert`` with ``protected``); this module finds which ones:

    reference_names   entity names from a reference list (link targets of the embedded Wikipedia
                      excerpt; known-facts or COUNTERFACT files; plain text files)
    NameIndex         those names grouped by their last token (by the model's tokenizer)
    leak              how much of the edit's change a key receives from a rank-one edit: Δ k_j = leak_j (v* − W k*)
    residual_share    how much of k* a set of held keys leaves to edit
"""

from __future__ import annotations

import bz2
import json
import re
from functools import lru_cache
from pathlib import Path

import torch

from ..io import check_input
from .models import LoadedModel, keys_at
from .prompts import encode, fill, subject_last_index

WIKIPEDIA = "wikipedia"
_LINK = re.compile(r"\[\[([^\[\]|#:]{2,100})(?:#[^\[\]|]*)?(?:\|[^\[\]]*)?\]\]")  # [[Target#anchor|label]]
_PARENS = re.compile(r"\s*\([^()]*\)$")  # "Richard Day (art director)" -> "Richard Day"


class ProtectError(ValueError):
    """An unusable reference list; one line for the user."""


def _clean(name: str) -> str | None:
    name = " ".join(_PARENS.sub("", name).split())
    return name if 2 <= len(name) <= 100 and name[:1].isupper() else None


@lru_cache(maxsize=4)
def wikipedia_names() -> tuple[str, ...]:
    """Link targets of the Wikipedia excerpt shipped in the gensim wheel (~15k entity names), sorted."""
    import gensim
    from gensim.corpora.wikicorpus import extract_pages

    from .statistics import WIKI_EXCERPT

    names = set()
    with bz2.BZ2File(Path(gensim.__file__).parent / WIKI_EXCERPT) as f:
        for _title, text, _pageid in extract_pages(f, filter_namespaces=("0",)):
            names.update(n for n in (_clean(m.group(1)) for m in _LINK.finditer(text)) if n)
    return tuple(sorted(names))


def _file_names(path: Path) -> list[str]:
    """A JSON list (of names, or of records with a 'subject' field) or a text file, one name a line."""
    check_input(path, "reference names file", ProtectError)  # a FIFO would block the read
    try:
        text = path.read_text()
    except OSError as e:
        raise ProtectError(f"{path}: cannot read the reference names ({e.strerror})") from e
    if path.suffix != ".json":
        return [n for n in (_clean(line) for line in text.splitlines()) if n]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProtectError(f"{path}: invalid JSON ({e.msg}, line {e.lineno})") from e
    if not isinstance(data, list):
        raise ProtectError(f"{path}: expected a JSON list of names or of records with a 'subject'")
    out = []
    for i, item in enumerate(data):
        name = item.get("subject") if isinstance(item, dict) else item
        if not isinstance(name, str):
            raise ProtectError(f"{path}: item {i}: expected a name or a record with a 'subject' string")
        if (clean := _clean(name)) is not None:
            out.append(clean)
    return out


def check_sources(sources: tuple[str, ...], root: Path, where: str) -> None:
    """Refuse missing reference-name files before any model is loaded (one line naming the field)."""
    for source in sources:
        if source != WIKIPEDIA and not (root / source).is_file():
            raise ProtectError(f"{where}: rome.protect_sources: {root / source}: file not found")


def reference_names(sources: tuple[str, ...], root: Path = Path(".")) -> list[str]:
    """The reference entity names of ``rome.protect_sources`` (paths relative to ``root``), deduplicated."""
    names: dict[str, None] = {}
    for source in sources:
        found = wikipedia_names() if source == WIKIPEDIA else _file_names(root / source)
        names.update(dict.fromkeys(found))
    return list(names)


def last_token(tokenizer, subject: str) -> int:
    """The id of the subject's last token, tokenised alone: where ROME reads its key."""
    return tokenizer(subject).input_ids[-1]


class NameIndex:
    """Reference names grouped by last token: the subjects that share a key position with an edit."""

    def __init__(self, tokenizer, names: list[str]):
        self.by_token: dict[int, list[str]] = {}
        for name, ids in zip(names, tokenizer(names).input_ids if names else []):
            self.by_token.setdefault(ids[-1], []).append(name)

    def sharing(self, tokenizer, subject: str) -> list[str]:
        """Other names whose last token is the subject's (the subject itself excluded)."""
        return [n for n in self.by_token.get(last_token(tokenizer, subject), []) if n != subject]


@torch.no_grad()
def bare_keys(lm: LoadedModel, layer: int, subjects: list[str], batch_size: int = 64,
              template: str = "{}") -> torch.Tensor:
    """The key at each subject's last token, the subject alone as the prompt (or filled into
    ``template``): (n, d_in)."""
    out = []
    for i in range(0, len(subjects), batch_size):
        chunk = subjects[i:i + batch_size]
        batch = encode(lm.tokenizer, [fill(template, s) for s in chunk])
        where = torch.tensor([subject_last_index(lm.tokenizer, template, s) for s in chunk])
        keys = keys_at(lm.model, [layer], batch.input_ids, batch.attention_mask)[layer]  # (B, T, d_in)
        out.append(keys[torch.arange(len(chunk)), where].float())
    return torch.cat(out)


def leak(c_inv_k_star: torch.Tensor, k_star: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """leak_j = (C⁻¹k*)ᵀ k_j / (C⁻¹k*)ᵀ k*: a rank-one edit moves key k_j's value by leak_j (v* − W k*).

    c_inv_k_star, k_star: (d_in,); keys: (n, d_in) -> (n,)
    """
    return (keys.double() @ c_inv_k_star.double()) / (k_star.double() @ c_inv_k_star.double())


def residual_share(solve, k_star: torch.Tensor, protected: torch.Tensor) -> float:
    """The share of k*'s C⁻¹-energy outside the span of the protected keys (1: none protected).

    (M₀₀ − M₀ₚ M_pp⁺ Mₚ₀) / M₀₀ for M = KᵀC⁻¹K, K = [k*, protected]: the Schur complement over M₀₀
    (a pseudo-inverse, so that protected keys may be linearly dependent among themselves).
    """
    if protected.numel() == 0:
        return 1.0
    keys = torch.cat([k_star[:, None], protected.T], 1)  # (d_in, n)
    m = keys.to(solve.device, torch.float64).T @ solve.solve64(keys)  # (n, n), on the solve's device
    b = m[1:, 0]  # (n - 1,)
    schur = m[0, 0] - b @ torch.linalg.pinv(m[1:, 1:], hermitian=True) @ b
    return float((schur / m[0, 0]).clamp(min=0.0))
