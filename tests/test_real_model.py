"""The engine on the real embedded default model, Gemma-3-270M (converted once into the cache).

Slow (minutes on a first run: conversion and 100k-token statistics; cached afterwards). Set
ROMEFLOW_SKIP_REAL=1 to skip locally; CI runs it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from romeflow.params import load_params as load_settings
from romeflow.deltas import EditedModel, compute_delta, load_delta, save_delta
from romeflow.evaluation import next_token_top
from romeflow.manifests import load_manifest
from romeflow.models import EMBEDDED, cache_dir, converted_folder, load_model
from romeflow.statistics import get_stats

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


def test_curie_edit_makes_medicine_top1_and_keeps_the_neighbour(gemma, settings, tmp_path):
    manifest = load_manifest(REPO / "edits" / "curie.yaml")
    layer = settings.rome.layer
    stats = get_stats(gemma, [layer], settings.stats.corpus_source(), settings.stats.tokens, cache_dir(),
                      settings.stats.seq_len)
    prompts = ["Pierre Curie's area of work is", *manifest.edits[0].paraphrases]
    assert len(prompts) >= 3
    neighbour = "Robert Millikan's area of work is"
    before = next_token_top(gemma, prompts + [neighbour], k=1)
    assert all(top[0][0] != " medicine" for top in before[:-1])

    save_delta(tmp_path / "curie.safetensors", compute_delta(gemma, manifest, settings.rome, stats))
    edited = EditedModel(gemma)
    edited.compose([load_delta(tmp_path / "curie.safetensors")])
    try:
        after = next_token_top(gemma, prompts + [neighbour], k=1)
    finally:
        edited.reset()
    assert [top[0][0] for top in after[:-1]] == [" medicine"] * (len(prompts))
    assert after[-1][0][0] == before[-1][0][0]
