"""JSON Schemas of every artifact (shipped in the package from the repository's ``schemas/``)."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path

import jsonschema


def _schema_text(name: str) -> str:
    """From the repository's schemas/ (source checkout) or the installed package data (wheel)."""
    in_repo = Path(__file__).resolve().parent.parent / "schemas" / f"{name}.schema.json"
    if in_repo.is_file():
        return in_repo.read_text()
    return resources.files("romeflow.json_schemas").joinpath(f"{name}.schema.json").read_text()


@cache
def _validator(name: str) -> jsonschema.protocols.Validator:
    schema = json.loads(_schema_text(name))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _where(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _say(error: jsonschema.ValidationError) -> str:
    v, kw = error.validator, error.validator_value
    if v == "required":
        missing = [k for k in kw if k not in (error.instance or {})]
        return f"missing required field '{missing[0]}'" if missing else error.message
    if v == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return f"unknown field '{extra[0]}'" if extra else error.message
    if v in ("minLength", "pattern") and isinstance(error.instance, str) and not error.instance.strip():
        return "must not be empty"
    if v == "pattern" and kw == "\\{\\}":
        return "must contain {} where the subject goes"
    if v == "minItems":
        return "must not be empty"
    if v == "type":
        return f"must be of type {kw}"
    if v == "oneOf":
        return "must be a prompt string or {prompt, answer}"
    return error.message


def validate(name: str, instance) -> list[tuple[str, str]]:
    """Errors as (where, what), e.g. ('edits[2].target', 'must not be empty'); [] when valid."""
    errors = sorted(_validator(name).iter_errors(instance), key=lambda e: (list(map(str, e.absolute_path)), e.validator))
    return [(_where(e.absolute_path), _say(e)) for e in errors]
