"""Honest reports (issue 20 §2): neighbours are test data and never constraints; what an edit holds by
construction (``protect:``) is listed apart and not scored; every eval asks reference subjects that share
the edited subject's last token whether they kept their answer (NS_tok)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from romeflow.engine.protect import NameIndex
from romeflow.engine.rome import EditRequest
from romeflow.engine.statistics import Stats
from romeflow.evaluation.bystanders import Bystanders, TokenSharing, held_subjects
from romeflow.evaluation.scoring import evaluate_manifest
from romeflow.pipeline.deltas import compute_delta, load_delta, save_delta
from romeflow.pipeline.compose import EditedModel
from romeflow.pipeline.manifests import ManifestEdit, load_manifest
from romeflow.pipeline.workflow import Gate, eval_gate, eval_manifest, eval_stack, stack_markdown
from romeflow.schemas import validate

from conftest import EDIT_LAYER, corpus_text
from test_rome import NLL_ONLY as PARAMS

CURIE = """edits:
  - subject: Pierre Curie
    relation: "{} worked in the field of"
    target: medicine
    target_true: physics
    neighbors: ["Marie Curie worked in the field of", "Albert Einstein worked in the field of"]
"""


def write_manifest(tmp_path, name: str, text: str):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return load_manifest(path)


@pytest.fixture
def gpt2(tiny_lm, second_moment):
    lm = tiny_lm("gpt2")
    stats = {EDIT_LAYER: Stats(second_moment("gpt2")[EDIT_LAYER],
                               {"corpus_id": "tiny", "corpus_sha256": "0" * 64, "tokens": 4000}, "1" * 64)}
    return lm, stats


def leak(delta, keys: torch.Tensor) -> torch.Tensor:
    """How much of the edit's change each key receives: (v·k) / (v·k*), keys (m, d_in) -> (m,)."""
    v, k_star = delta.updates[0].v, delta.pairs[0].k_star
    return (keys @ v) / (k_star @ v)


def test_a_neighbour_is_never_a_constraint_unless_it_is_in_protect(tmp_path, gpt2):
    lm, stats = gpt2
    plain = compute_delta(lm, write_manifest(tmp_path, "plain", CURIE), PARAMS, stats)
    assert plain.meta["edits"][0]["protected"] == [] and plain.pairs[0].protected is None

    held_text = CURIE + "    protect: [Marie Curie]\n"
    held = compute_delta(lm, write_manifest(tmp_path, "held", held_text), PARAMS, stats)
    assert held.meta["edits"][0]["protected"] == ["Marie Curie"]  # Einstein, also a neighbour, is not held
    marie = held.pairs[0].protected  # (2, d_in): her bare and prefix-averaged keys
    assert marie.shape == (2, plain.updates[0].v.shape[0])
    # Held: her keys receive none of the change (Eq. 2's constraint, up to float32 rounding of the solve);
    # not held: the plain insert moves them by a visible share of it.
    assert leak(held, marie).abs().max() < 1e-4
    assert leak(plain, marie).abs().max() > 1e-2


def test_held_neighbours_are_listed_and_never_scored(tmp_path, gpt2):
    lm, stats = gpt2
    m = write_manifest(tmp_path, "held", CURIE + "    protect: [Marie Curie]\n")
    r = evaluate_manifest(EditedModel(lm), m, [compute_delta(lm, m, PARAMS, stats)])
    post = r["edits"][0]["post"]
    marie, einstein = post["neighbors"]
    assert post["held"] == ["Marie Curie"] and r["other_subjects"][0]["held"] == ["Marie Curie"]
    assert marie["held"] and not einstein["held"]
    assert marie["shares_last_token"]  # she would count in NS_tok, were she not held
    # only Einstein is scored: NS and top-1 kept are his alone (one unanswered prompt: 0 or 100 exactly)
    assert r["post"]["NS"] == 100.0 * einstein["success"]
    assert r["post"]["neighbor_top1_kept"] == 100.0 * einstein["top1_kept"]
    assert "NS_tok" not in r["post"]  # no token-sharing subject left to score (none mined here)


def test_a_delta_that_held_its_neighbours_still_loads_and_they_are_not_scored(tmp_path, gpt2, monkeypatch):
    """A delta computed before neighbours stopped being constraints records their subjects as
    ``protected`` in its metadata: it loads, and the eval reads them as held by construction."""
    lm, stats = gpt2
    m = write_manifest(tmp_path, "old", CURIE)
    before = ("Marie Curie", "Albert Einstein")  # what the old ManifestEdit.request passed as protect
    with monkeypatch.context() as patch:
        patch.setattr(ManifestEdit, "request", property(
            lambda e: EditRequest(e.subject, e.relation, e.target, e.target_true, before)))
        save_delta(tmp_path / "old.safetensors", compute_delta(lm, m, PARAMS, stats))
    old = load_delta(tmp_path / "old.safetensors")
    assert old.meta["edits"][0]["protected"] == list(before) and old.pairs[0].protected.shape[0] == 4
    assert held_subjects(m, [old]) == (before,) and held_subjects(m) == ((),)
    r = evaluate_manifest(EditedModel(lm), m, [old])
    assert all(n["held"] for n in r["edits"][0]["post"]["neighbors"])
    assert "NS" not in r["post"] and "neighbor_top1_kept" not in r["post"]  # by construction: not scores
    assert r["other_subjects"][0]["held"] == list(before)


CURIES = ["Marie Curie", "Eve Curie", "Paul Curie", "Irene Curie", "Jacques Curie", "Pierre Curie", "Albert Einstein"]


def test_token_sharing_subjects_are_mined_deterministically(tmp_path, tiny_lm):
    tok = tiny_lm("gpt2").tokenizer
    assert NameIndex(tok, CURIES).sharing(tok, "Pierre Curie") == CURIES[:5]  # the tiny BPE ends them in " Curie"
    m = write_manifest(tmp_path, "m", """edits:
  - subject: Pierre Curie
    relation: "{} worked in the field of"
    target: medicine
    neighbors: ["Irene Curie worked in the field of"]
    protect: [Jacques Curie]
""")
    held = held_subjects(m)
    got = TokenSharing(CURIES, 2).mine(tok, m, held)
    # less the subject, the held subject and the neighbour's own subject; then a seeded order
    pool = sorted(["Marie Curie", "Eve Curie", "Paul Curie"],
                  key=lambda n: hashlib.sha256(f"Pierre Curie\n{n}".encode()).digest())
    assert got == (tuple(pool[:2]),)
    assert TokenSharing(list(reversed(CURIES)), 2).mine(tok, m, held) == got  # not the list's order
    assert TokenSharing(CURIES, 10).mine(tok, m, held) == (tuple(pool),)
    assert Bystanders.of(m, (), TokenSharing(CURIES, 0), tok).mined == ((),)


def test_ns_tok_counts_the_mined_subjects_and_gate_eval_ns_tok_reads_it(tmp_path, gpt2):
    lm, stats = gpt2
    m = write_manifest(tmp_path, "plain", "\n".join(CURIE.splitlines()[:5]) + "\n")  # no neighbours
    d = compute_delta(lm, m, PARAMS, stats)
    d.path = str(tmp_path / "plain.safetensors")
    save_delta(d.path, d)
    result = eval_manifest(EditedModel(lm), m, [d], sharing=TokenSharing(CURIES, 3))
    report, rows = result.report, result.details["edits"][0]["post"]["token_sharing"]
    assert validate("report", report) == [] and validate("details", json.loads(json.dumps(result.details))) == []
    asked = report["other_subjects"][0]["asked"]
    assert len(asked) == 3 and set(asked) <= set(CURIES[:5]) - {"Pierre Curie"}
    assert [r["subject"] for r in rows] == asked
    assert report["pre"]["NS_tok"] == 100.0  # the unedited model keeps its own top-1
    # one edit: NS_tok is the share of its mined subjects that kept their top-1 (the same 3 booleans)
    assert report["post"]["NS_tok"] == pytest.approx(100.0 * sum(r["top1_kept"] for r in rows) / 3)
    moved = report["other_subjects"][0]["moved"]
    assert [x["subject"] for x in moved] == [r["subject"] for r in rows if not r["top1_kept"]]
    for x, r in zip(moved, [r for r in rows if not r["top1_kept"]]):
        assert (x["before"], x["after"]) == (lm.tokenizer.decode(r["base_top1"]), lm.tokenizer.decode(r["top1"]))
    ns = report["post"]["NS_tok"]
    assert eval_gate(report, Gate(eval={"NS_tok": ns})) == []
    assert eval_gate(report, Gate(eval={"NS_tok": ns + 1})) == [
        f"manifest plain: post NS_tok = {ns:.1f} is below the gate (gate.eval.NS_tok = {ns + 1:g})"]


def test_the_stack_lists_held_subjects_and_scores_alone_as_eval_does(tmp_path, gpt2):
    lm, stats = gpt2
    m = write_manifest(tmp_path, "held", CURIE + "    protect: [Marie Curie]\n")
    d = compute_delta(lm, m, PARAMS, stats)
    d.path = str(tmp_path / "held.safetensors")
    save_delta(d.path, d)
    (tmp_path / "heldout.txt").write_text(corpus_text(seed=99, n_paragraphs=2))
    sharing = TokenSharing(CURIES, 2)
    stack = eval_stack(EditedModel(lm), [m], [d], tmp_path / "heldout.txt", 64, sharing=sharing)
    report = stack.report
    assert validate("stack", report) == []
    assert report["manifests"]["held"]["held"] == ["Marie Curie"]
    assert report["damage"]["neighbors"]["prompts"] == 1 and report["damage"]["neighbors"]["held"] == 1
    assert "Held by construction" in stack_markdown(report) and "held: Marie Curie" in stack_markdown(report)
    # "alone" is eval's "post", token-sharing subjects included
    post = eval_manifest(EditedModel(lm), m, [d], sharing=sharing).report["post"]
    assert report["manifests"]["held"]["alone"] == post and "NS_tok" in post
