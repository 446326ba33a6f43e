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


def _show(value) -> str:
    """A number as itself; anything else by its kind only: a message never echoes text from the file (a
    params file or manifest that is a link to /etc/passwd must not show it)."""
    if value is None or isinstance(value, (bool, int, float)):
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."
    return {str: "a string", list: "a list", dict: "a mapping"}.get(type(value), f"a {type(value).__name__}")


_TYPES = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
          "array": "a list", "object": "a mapping", "null": "null"}


def _describe(schema: dict) -> str:
    """A subschema in words, e.g. 'an integer >= 0' or "'auto'" (for anyOf / oneOf messages)."""
    if "const" in schema:
        return repr(schema["const"])
    if "enum" in schema:
        return " or ".join(map(repr, schema["enum"]))
    t = schema.get("type")
    words = " or ".join(_TYPES.get(x, x) for x in (t if isinstance(t, list) else [t])) if t else "a value"
    bounds = [f"{op} {schema[k]:g}" for k, op in (("minimum", ">="), ("exclusiveMinimum", ">"),
                                                    ("maximum", "<="), ("exclusiveMaximum", "<")) if k in schema]
    return words + (" " + " and ".join(bounds) if bounds else "")


def _branch(error: jsonschema.ValidationError):
    """For oneOf/anyOf: the error inside the one branch whose type fits the value, if exactly one does."""
    fits = {}
    for sub in error.context or []:
        i = sub.relative_schema_path[0]
        branch = error.validator_value[i]
        t = branch.get("type")
        if t is not None and jsonschema.Draft202012Validator({"type": t}).is_valid(error.instance):
            fits.setdefault(i, []).append(sub)
    return min(fits.popitem()[1], key=lambda e: len(e.path)) if len(fits) == 1 else None


_BOUNDS = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}


def _say(error: jsonschema.ValidationError) -> str:
    v, kw = error.validator, error.validator_value
    got = f", got {_show(error.instance)}"
    if v == "required":
        missing = [k for k in kw if k not in (error.instance or {})]
        return f"missing required field '{missing[0]}'" if missing else error.message
    if v == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return f"unknown field '{extra[0]}'" if extra else error.message
    if v in ("minLength", "pattern") and isinstance(error.instance, str) and not error.instance.strip():
        return "must not be empty"
    if v == "pattern" and "patternMessage" in error.schema:  # a rule that says what its pattern means
        return f"{error.schema['patternMessage']}{got}"
    if v == "pattern" and kw == "\\{\\}":
        return "must contain {} where the subject goes"
    if v == "minItems":
        return "must not be empty" if kw == 1 else f"must have at least {kw} items"
    if v == "maxItems":
        return f"has {len(error.instance)} items, more than the {kw} allowed"
    if v == "maxLength":
        return f"is {len(error.instance)} characters long, more than the {kw} allowed"
    if v == "type":
        return f"must be {_describe({'type': kw})}{got}"
    if v in _BOUNDS:
        return f"must be {_BOUNDS[v]} {kw:g}{got}"
    if v in ("const", "enum"):
        return f"must be {_describe(error.schema)}{got}"
    if v == "uniqueItems":
        return "must not repeat an item"
    if v in ("oneOf", "anyOf"):
        return f"must be {' or '.join(_describe(s) for s in kw)}{got}"
    return error.message


def validate(name: str, instance) -> list[tuple[str, str]]:
    """Errors as (where, what), e.g. ('edits[2].target', 'must not be empty'); [] when valid."""
    return validate_with(_validator(name), instance)


def validate_with(validator: jsonschema.protocols.Validator, instance) -> list[tuple[str, str]]:
    """As validate, with a validator built elsewhere (e.g. params.yaml's, completed from dataclasses)."""
    errors = []
    for e in validator.iter_errors(instance):
        if e.validator in ("oneOf", "anyOf"):
            e = _branch(e) or e
        errors.append(e)
    errors.sort(key=lambda e: (list(map(str, e.absolute_path)), e.validator))
    return [(_where(e.absolute_path), _say(e)) for e in errors]
