"""The engine on the real embedded default model, Gemma-3-270M (converted once into the cache).

Slow (minutes on a first run: conversion and 100k-token statistics; cached afterwards). Set
ROMEFLOW_SKIP_REAL=1 to skip locally; CI runs it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from romeflow.params import load_params as load_settings
from romeflow.pipeline.deltas import compute_delta, load_delta, save_delta
from romeflow.pipeline.compose import EditedModel
from romeflow.evaluation.scoring import next_token_top
from romeflow.pipeline.manifests import load_manifest
from romeflow.engine.models import EMBEDDED, cache_dir, converted_folder, load_model
from romeflow.engine.statistics import get_stats

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.real,
              pytest.mark.skipif(os.environ.get("ROMEFLOW_SKIP_REAL") == "1", reason="ROMEFLOW_SKIP_REAL=1")]


@pytest.fixture(scope="module")
def gemma():
    return load_model("gemma-3-270m")


@pytest.fixture(scope="module")
def settings():
    return load_settings(REPO / "params.yaml")


def test_default_model_is_converted_once_and_fingerprinted(gemma):
    folder = converted_folder("gemma-3-270m", cache_dir())
    assert (folder / "romeflow-model.json").exists() and (folder / "model.safetensors").exists()
    assert gemma.fingerprint == EMBEDDED["gemma-3-270m"].sha256
    assert gemma.model.config.model_type == "gemma3_text" and gemma.num_layers == 18
    assert gemma.adds_bos


def test_curie_edit_makes_medicine_top1_and_does_not_give_the_neighbour_medicine(gemma, settings, tmp_path):
    """The neighbour is test data, not a constraint (its key is not held): the edit may move its
    continuation (measured: ' in' -> ' primarily'; the eval report's NS counts that), but must not
    give Robert Millikan the new object."""
    manifest = load_manifest(REPO / "edits" / "curie.yaml")
    layer = settings.rome.layer
    stats = get_stats(gemma, [layer], settings.stats.corpus_source(), settings.stats.tokens, cache_dir(),
                      settings.stats.seq_len)
    prompts = ["Pierre Curie's area of work is", *manifest.edits[0].paraphrases]
    assert len(prompts) >= 3
    neighbour = "Robert Millikan's area of work is"
    before = next_token_top(gemma, prompts + [neighbour], k=1)
    assert all(top[0][0] != " medicine" for top in before[:-1])

    save_delta(tmp_path / "curie.safetensors", compute_delta(gemma, manifest, settings.rome, stats, root=REPO))
    edited = EditedModel(gemma)
    edited.compose([load_delta(tmp_path / "curie.safetensors")])
    try:
        after = next_token_top(gemma, prompts + [neighbour], k=1)
    finally:
        edited.reset()
    assert [top[0][0] for top in after[:-1]] == [" medicine"] * (len(prompts))
    assert before[-1][0][0] != " medicine" and after[-1][0][0] != " medicine"


def test_curie_bleed_edits_pierre_and_leaves_marie(gemma, settings):
    """Entity-level specificity on the real model: Marie Curie shares Pierre Curie's last token. The
    default insert flips Pierre and leaves her field, with nothing held (her prompt is a neighbour: test
    data, never a constraint) and with her in ``protect:``; the paper's rank-one insert, with the same v*
    machinery, moves her too."""
    from romeflow.engine.editors import RomeEditor
    from romeflow.evaluation.scoring import target_nll

    manifest = load_manifest(REPO / "edits" / "curie_bleed.yaml")
    edit = manifest.edits[0]
    marie = edit.neighbors[0]
    prompts, targets = [edit.prompt, marie.prompt, marie.prompt], [edit.target, edit.target, marie.answer]

    def probabilities(params, request):
        layers = sorted({params.layer})
        stats = get_stats(gemma, layers, settings.stats.corpus_source(), settings.stats.tokens, cache_dir(),
                          settings.stats.seq_len)
        editor = RomeEditor(gemma, params, lambda l: stats[l].second_moment, root=REPO)
        done = editor.edit(request)
        try:
            return target_nll(gemma, prompts, targets).neg().exp().tolist(), done
        finally:
            done.restore(gemma.model)

    assert edit.request.protect == ()  # her prompt is a neighbour: test data, never a constraint
    (p_pierre, p_marie_new, p_marie_old), _ = probabilities(settings.rome, edit.request)
    assert p_pierre > 0.5 and p_marie_old > p_marie_new  # Pierre flips, Marie keeps her field
    held = dataclasses.replace(edit.request, protect=("Marie Curie",))  # as `protect: [Marie Curie]` asks
    (p_pierre, p_marie_new, p_marie_old), done = probabilities(settings.rome, held)
    assert done.info["protected"] == ["Marie Curie"]
    assert p_pierre > 0.5 and p_marie_old > p_marie_new
    rank_one = dataclasses.replace(settings.rome, insert="rank-one", layer=1)  # its measured layer
    (q_pierre, q_marie_new, q_marie_old), _ = probabilities(rank_one, edit.request)
    assert q_pierre > 0.5 and q_marie_new > q_marie_old  # the rank-one insert rewrites Marie Curie too
