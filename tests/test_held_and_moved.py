"""Honest reports (issue 20 §2): neighbours are test data and never constraints; what an edit holds by
construction (``protect:``) is listed apart and not scored; every eval asks reference subjects that share
the edited subject's last token whether they kept their answer (NS_tok)."""

from __future__ import annotations

import pytest
import torch

from romeflow.engine.statistics import Stats
from romeflow.pipeline.deltas import compute_delta
from romeflow.pipeline.manifests import load_manifest

from conftest import EDIT_LAYER
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
