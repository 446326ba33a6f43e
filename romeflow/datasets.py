"""Evaluation datasets: COUNTERFACT (the paper's schema and the flat one of editing toolkits) and zsRE.

Loaders read a path the user brings and fail with one line naming the file, the record and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .prompts import fill
from .rome import EditRequest


class DatasetError(ValueError):
    """An unreadable or invalid dataset file; str(error) is the one-line message for the user."""


def _read_list(path: str | Path, what: str) -> list:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise DatasetError(f"{path}: cannot read {what} records ({e.strerror})") from e
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: invalid JSON ({e.msg}, line {e.lineno})") from e
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of {what} records")
    return data


def _text(raw: dict, key: str) -> str:
    value = raw[key]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"'{key}' (must be a non-empty string)")
    return value


def _texts(raw: dict, key: str, default=None) -> tuple[str, ...]:
    if key not in raw and default is not None:
        return default
    value = raw[key]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"'{key}' (must be a list of non-empty strings)")
    return tuple(value)


# --------------------------------------------------------------------------------------------------
# COUNTERFACT
# --------------------------------------------------------------------------------------------------


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
                                 _texts(raw, "generation_prompts", ()), _texts(raw, "attribute_prompts", ()))
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
