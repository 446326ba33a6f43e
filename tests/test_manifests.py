"""Manifest validation: every bad manifest fails with one line naming file, edit index and field."""

from pathlib import Path

import pytest

from romeflow.pipeline.manifests import ManifestError, load_manifest

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "m.yaml"
    p.write_text(text)
    return p


GOOD = """
edits:
  - subject: Pierre Curie
    relation: "{}'s area of work is"
    target: medicine
    target_true: physics
    paraphrases: ["Pierre Curie works in the field of"]
    neighbors: ["Robert Millikan's area of work is", {prompt: "Marie Curie's area of work is", answer: physics}]
"""


def test_good_manifest_parses(tmp_path):
    m = load_manifest(write(tmp_path, GOOD))
    assert m.name == "m" and len(m.sha256) == 64
    e = m.edits[0]
    assert e.prompt == "Pierre Curie's area of work is"
    assert e.neighbors[1].answer == "physics" and e.neighbors[0].answer is None
    assert m.layer_of(e, 7) == 7
    assert m.canonical()["edits"][0]["target"] == "medicine"


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "edits").glob("*.yaml")))
def test_shipped_manifests_are_valid(name):
    m = load_manifest(REPO / "edits" / name)
    assert m.edits


@pytest.mark.parametrize("text, expected", [
    ("edits: [\n  {subject: a", "invalid YAML at line"),
    ("", "(top level): the manifest is empty"),
    ("edits: []", "edits: must not be empty"),
    ("edits:\n  - {subject: S, relation: '{} is', target: ''}", "edits[0].target: must not be empty"),
    ("edits:\n  - {subject: S, relation: '{} is', target: '   '}", "edits[0].target: must not be empty"),
    ("edits:\n  - {subject: S, relation: 'no slot', target: x}", "edits[0].relation: must contain {}"),
    ("edits:\n  - {subject: S, relation: '{} and {}', target: x}", "edits[0].relation: must contain {} exactly once"),
    ("edits:\n  - {relation: '{} is', target: x}", "edits[0]: missing required field 'subject'"),
    ("edits:\n  - {subject: S, relation: '{} is', target: x, colour: red}", "edits[0]: unknown field 'colour'"),
    ("edits:\n  - {subject: S, relation: '{} is', target: x, paraphrases: ['T is']}",
     "edits[0].paraphrases[0]: subject 'S' not found in the prompt"),
    ("edits:\n  - {subject: S, relation: '{} is', target: x}\n  - {subject: S, relation: '{} is', target: x}",
     "edits[1]: duplicate of edits[0]"),
    ("edits:\n  - {subject: S, relation: '{} is', target: x}\n  - {subject: S, relation: '{} is', target: y}",
     "edits[1].target: conflicts with edits[0]"),
    ("edits:\n  - {subject: S, relation: '{} is', target: x, target_true: x}", "edits[0].target: is the same as target_true"),
    ("edits:\n  - {subject: S, relation: '{} is', target: x, layer: -1}", "edits[0].layer"),
])
def test_bad_manifests_fail_with_one_line(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "\n" not in message


def test_missing_file(tmp_path):
    with pytest.raises(ManifestError, match="cannot read manifest"):
        load_manifest(tmp_path / "nope.yaml")
