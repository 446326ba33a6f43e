"""Committed benchmark reports stay readable: each validates against its schema (an artifact's format
string is a contract with every run folder already written, not a module path)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from romeflow.schemas import validate

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("schema, pattern", [("bench-stack", "reports/bench/stack-*/report.json")])
def test_committed_reports_validate_against_their_schema(schema, pattern):
    reports = sorted(ROOT.glob(pattern))
    if not reports:
        pytest.skip(f"no committed {pattern}")
    for path in reports:
        assert validate(schema, json.loads(path.read_text())) == [], path
