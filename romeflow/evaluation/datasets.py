"""Evaluation datasets: COUNTERFACT (the paper's schema and the flat one of editing toolkits) and zsRE.

Loaders read a path the user brings and fail with one line naming the file, the record and the field.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

from ..engine.prompts import MAX_PROMPT_CHARS, fill
from ..io import check_input, json_number_problem
from ..engine.rome import EditRequest


class DatasetError(ValueError):
    """An unreadable or invalid dataset file; str(error) is the one-line message for the user."""


def _read_list(path: str | Path, what: str) -> list:
    path = check_input(path, f"{what} records file", DatasetError)  # a FIFO would block the read
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise DatasetError(f"{path}: cannot read {what} records ({e.strerror})") from e
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: invalid JSON ({e.msg}, line {e.lineno})") from e
    except ValueError as e:  # an integer of more digits than Python converts
        raise DatasetError(f"{path}: invalid JSON ({json_number_problem(e)})") from e
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of {what} records")
    return data


def _text(raw: dict, key: str) -> str:
    value = raw[key]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"'{key}' (must be a non-empty string)")
    if len(value) > MAX_PROMPT_CHARS:
        raise ValueError(f"'{key}' (is {len(value)} characters long, more than the {MAX_PROMPT_CHARS} allowed)")
    return value


def _texts(raw: dict, key: str, default=None) -> tuple[str, ...]:
    if key not in raw and default is not None:
        return default
    value = raw[key]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"'{key}' (must be a list of non-empty strings)")
    if any(len(v) > MAX_PROMPT_CHARS for v in value):
        raise ValueError(f"'{key}' (a string longer than the {MAX_PROMPT_CHARS} characters allowed)")
    return tuple(value)


# --------------------------------------------------------------------------------------------------
# COUNTERFACT
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenNeighbor:
    """Another subject that shares the edited subject's last token, asked the same relation."""

    subject: str
    prompt: str  # the record's relation template, filled with this subject
    answer: str  # its own object (from its record or known fact), which differs from the new target


@dataclass(frozen=True)
class CounterfactRecord:
    case_id: int
    subject: str
    relation: str  # template with {} for the subject
    target_new: str
    target_true: str
    paraphrases: tuple[str, ...]
    neighborhood: tuple[str, ...]  # prompts whose answer is target_true
    generation: tuple[str, ...] = ()  # only in the paper's schema
    attribute: tuple[str, ...] = ()
    relation_id: str | None = None  # only in the paper's schema
    token_neighbors: tuple[TokenNeighbor, ...] = ()  # filled by mine_token_neighbors

    @property
    def request(self) -> EditRequest:
        return EditRequest(self.subject, self.relation, self.target_new, self.target_true)

    @property
    def prompt(self) -> str:
        return fill(self.relation, self.subject)


def _counterfact(raw: dict) -> CounterfactRecord:
    if not isinstance(raw, dict):
        raise ValueError("(must be an object)")
    if "requested_rewrite" in raw:  # the paper's schema
        rw = raw["requested_rewrite"]
        relation = _text(rw, "prompt")
        if "{}" not in relation:
            raise ValueError("'requested_rewrite.prompt' (needs {} where the subject goes)")
        return CounterfactRecord(int(raw["case_id"]), _text(rw, "subject"), relation,
                                 _text(rw["target_new"], "str"), _text(rw["target_true"], "str"),
                                 _texts(raw, "paraphrase_prompts"), _texts(raw, "neighborhood_prompts"),
                                 _texts(raw, "generation_prompts", ()), _texts(raw, "attribute_prompts", ()),
                                 str(rw["relation_id"]) if rw.get("relation_id") is not None else None)
    # the flat schema: the prompt has the subject filled in
    subject, prompt = _text(raw, "subject"), _text(raw, "prompt")
    if subject not in prompt:
        raise ValueError("'subject' (not found in the prompt)")
    return CounterfactRecord(int(raw["case_id"]), subject, prompt.replace(subject, "{}", 1),
                             _text(raw, "target_new"), _text(raw, "ground_truth"), (_text(raw, "rephrase_prompt"),),
                             (_text(raw, "locality_prompt"),))


def load_counterfact(path: str | Path) -> list[CounterfactRecord]:
    """COUNTERFACT records in the paper's schema or the flat one (both may be mixed)."""
    records = []
    for i, raw in enumerate(_read_list(path, "COUNTERFACT")):
        try:
            records.append(_counterfact(raw))
        except (KeyError, TypeError, ValueError) as e:
            field = f"'{e.args[0]}'" if isinstance(e, KeyError) else str(e)
            raise DatasetError(f"{path}: record {i}: missing or invalid field {field}") from e
    return records


# --------------------------------------------------------------------------------------------------
# Token-sharing neighbourhoods (NS_tok): other subjects with the edited subject's last token
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    """A (subject, relation, object) triple a neighbour can be drawn from."""

    subject: str
    relation: str  # template with {}
    answer: str
    relation_id: str | None = None


def load_known_facts(path: str | Path) -> list[Fact]:
    """The paper's known facts (known_1000.json): subject, prompt (the subject filled in), attribute."""
    facts = []
    for i, raw in enumerate(_read_list(path, "known-facts")):
        try:
            subject, prompt = _text(raw, "subject"), _text(raw, "prompt")
            if subject not in prompt:
                raise ValueError("'subject' (not found in the prompt)")
            facts.append(Fact(subject, prompt.replace(subject, "{}", 1), _text(raw, "attribute").strip(),
                              str(raw["relation_id"]) if raw.get("relation_id") is not None else None))
        except (KeyError, TypeError, ValueError) as e:
            field = f"'{e.args[0]}'" if isinstance(e, KeyError) else str(e)
            raise DatasetError(f"{path}: record {i}: missing or invalid field {field}") from e
    return facts


def _same_relation(a_relation: str, a_id: str | None, b_relation: str, b_id: str | None) -> bool:
    """Relation ids when both have one (the paper's schema), else the same template text."""
    return a_id == b_id if a_id is not None and b_id is not None else a_relation == b_relation


def mine_token_neighbors(records: list[CounterfactRecord], tokenizer, k: int, extra: list[Fact] = (),
                         seed: int = 0) -> list[CounterfactRecord]:
    """Each record with up to k token-sharing neighbours (``token_neighbors``).

    A neighbour is another subject (from the records themselves and from ``extra`` facts) whose LAST
    token, by the model's tokenizer, is the edited subject's last token, whose fact has the same
    relation, and whose own answer differs from the record's new target. It is asked with the
    record's own relation template; success (NS_tok) means P[its answer] > P[new target] after the
    edit. Up to k are drawn per record, distinct subjects, in a seeded order.
    """
    pool = [Fact(r.subject, r.relation, r.target_true, r.relation_id) for r in records] + list(extra)
    subjects = sorted({f.subject for f in pool})
    last = {s: ids[-1] for s, ids in zip(subjects, tokenizer(subjects).input_ids)}  # subject -> last token id
    by_token: dict[int, list[Fact]] = {}
    for f in pool:
        by_token.setdefault(last[f.subject], []).append(f)
    out = []
    for rec in records:
        seen, found = {rec.subject}, []
        candidates = by_token.get(last[rec.subject], [])
        rng = random.Random(f"{seed}:{rec.case_id}")
        for f in rng.sample(candidates, len(candidates)):
            if len(found) == k:
                break
            if f.subject in seen or f.answer.strip().lower() == rec.target_new.strip().lower():
                continue
            if not _same_relation(rec.relation, rec.relation_id, f.relation, f.relation_id):
                continue
            seen.add(f.subject)
            found.append(TokenNeighbor(f.subject, fill(rec.relation, f.subject), f.answer))
        out.append(replace(rec, token_neighbors=tuple(found)))
    return out


# --------------------------------------------------------------------------------------------------
# zsRE (MEND's eval format)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZsreRecord:
    case_id: int  # position in the file
    subject: str
    question: str  # src: the edit prompt, contains the subject
    rephrase: str
    target_new: str  # alt
    answers: tuple[str, ...]  # the true answers
    loc: str  # an unrelated question ...
    loc_answer: str  # ... and its answer

    @property
    def request(self) -> EditRequest:
        true = self.answers[0] if self.answers else None
        return EditRequest(self.subject, self.question.replace(self.subject, "{}", 1), self.target_new, true)


def _zsre(i: int, raw: dict) -> ZsreRecord:
    if not isinstance(raw, dict):
        raise ValueError("(must be an object)")
    subject, src = _text(raw, "subject"), _text(raw, "src")
    if subject not in src:
        raise ValueError("'subject' (not found in src)")
    return ZsreRecord(i, subject, src, _text(raw, "rephrase"), _text(raw, "alt"), _texts(raw, "answers", ()),
                      _text(raw, "loc"), _text(raw, "loc_ans"))


def load_zsre(path: str | Path) -> list[ZsreRecord]:
    """zsRE records in MEND's eval format: subject, src, rephrase, alt, answers, loc, loc_ans."""
    records = []
    for i, raw in enumerate(_read_list(path, "zsRE")):
        try:
            records.append(_zsre(i, raw))
        except (KeyError, TypeError, ValueError) as e:
            field = f"'{e.args[0]}'" if isinstance(e, KeyError) else str(e)
            raise DatasetError(f"{path}: record {i}: missing or invalid field {field}") from e
    return records


def records_with_token_neighbors(records_path: str | Path, tokenizer, k: int,
                                 facts_path: str | Path | None = None) -> list[CounterfactRecord]:
    """The COUNTERFACT records of a file that have token-sharing neighbours (mined with ``tokenizer``, at
    most k each, from the file itself and the known facts of ``facts_path``), in file order."""
    known = load_known_facts(facts_path) if facts_path else []
    return [r for r in mine_token_neighbors(load_counterfact(records_path), tokenizer, k, known) if r.token_neighbors]
