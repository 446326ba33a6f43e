"""Scoring: hand-computed metric cases, COUNTERFACT loading, and batched NLL against a direct computation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from romeflow.evaluation.scoring import (harmonic_mean, load_counterfact, manifest_metrics, record_metrics, target_nll)
from romeflow.engine.models import final_hidden, logits_at


def test_record_metrics_hand_computed():
    # NLLs chosen so the probabilities are exact-ish: P = exp(-nll)
    new_wins, old_wins = (math.log(2), math.log(4)), (math.log(4), math.log(2))  # P .5 vs .25 / .25 vs .5
    scores = {"rewrite": [new_wins], "paraphrase": [new_wins, old_wins], "neighborhood": [old_wins, old_wins]}
    m = record_metrics(scores)
    assert m["ES"] == 100.0 and m["PS"] == 50.0 and m["NS"] == 100.0
    assert m["EM"] == pytest.approx(25.0) and m["PM"] == pytest.approx(0.0) and m["NM"] == pytest.approx(25.0)


def test_harmonic_mean():
    assert harmonic_mean([100, 50, 100]) == pytest.approx(75.0)
    assert harmonic_mean([100, 0, 100]) == 0.0


def test_manifest_metrics_average_per_edit_then_over_edits():
    def row(pt, po):
        return {"p_target": pt, "p_old": po, "success": pt > po, "top1_is_target": pt > 0.5}

    edits = [
        {"rewrite": row(0.9, 0.1), "paraphrases": [row(0.6, 0.1), row(0.1, 0.2)],
         "neighbors": [{"answer": "x", "p_answer": 0.5, "p_target": 0.1, "success": True, "top1_kept": True}]},
        {"rewrite": row(0.2, 0.3), "paraphrases": [row(0.3, 0.1)],
         "neighbors": [{"answer": None, "success": False, "top1_kept": False}]},
    ]
    m = manifest_metrics(edits)
    assert m["ES"] == 50.0
    assert m["PS"] == pytest.approx((50.0 + 100.0) / 2)
    assert m["NS"] == 50.0 and m["neighbor_top1_kept"] == 50.0
    assert m["EM"] == pytest.approx(100 * ((0.9 - 0.1) + (0.2 - 0.3)) / 2)
    assert m["NM"] == pytest.approx(100 * 0.4)  # only neighbours with an answer have a margin
    assert m["S"] == pytest.approx(harmonic_mean([50.0, 75.0, 50.0]))


def test_load_counterfact_both_schemas(tmp_path):
    flat = {"case_id": 7, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
            "target_new": "English", "ground_truth": "French", "rephrase_prompt": "Danielle Darrieux spoke",
            "locality_prompt": "The mother tongue of Jean Gabin is", "locality_ground_truth": "French"}
    paper = {"case_id": 8, "requested_rewrite": {"prompt": "{} plays", "subject": "Toko Yasuda",
                                                 "target_new": {"str": "piano"}, "target_true": {"str": "guitar"}},
             "paraphrase_prompts": ["Toko Yasuda is known for"], "neighborhood_prompts": ["Jimi Hendrix plays"],
             "generation_prompts": ["Toko Yasuda is"], "attribute_prompts": []}
    p = tmp_path / "cf.json"
    p.write_text(json.dumps([flat, paper]))
    a, b = load_counterfact(p)
    assert a.relation == "The mother tongue of {} is" and a.target_true == "French"
    assert b.relation == "{} plays" and b.neighborhood == ("Jimi Hendrix plays",) and b.generation == ("Toko Yasuda is",)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{**flat, "subject": "Nobody"}]))
    with pytest.raises(ValueError, match="record 0"):
        load_counterfact(bad)


@pytest.mark.parametrize("model_type", ["gpt2", "gemma3_text"])
def test_target_nll_matches_a_direct_computation(tiny_lm, model_type):
    lm = tiny_lm(model_type)
    prompts = ["Pierre Curie worked in the field of", "The Space Needle is in"]
    targets = ["medicine", "Paris"]
    got = target_nll(lm, prompts, targets)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        ids = lm.tokenizer(p).input_ids
        tgt = lm.tokenizer(" " + t, add_special_tokens=False).input_ids
        x = torch.tensor([ids + tgt])
        with torch.no_grad():
            logp = logits_at(lm.model, final_hidden(lm.model, x, torch.ones_like(x))[0]).log_softmax(-1)
        want = -sum(logp[len(ids) - 1 + j, tok].item() for j, tok in enumerate(tgt)) / len(tgt)
        # a padded batch vs one prompt: float32 rounding only (≲1e-6 relative on NLLs of ~7; 0 measured here)
        assert got[i].item() == pytest.approx(want, rel=1e-5)
