"""The paper's metrics on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from romeflow.evaluation.bench import counterfact_record_values, consistency, reference_texts
from romeflow.evaluation.datasets import CounterfactRecord
from romeflow.evaluation.metrics import (TfidfSimilarity, generation_entropy, harmonic_mean, magnitude, mean_ci, ngram_entropy,
                              score_ci, success)

NLL = lambda p: -math.log(p)  # noqa: E731


def test_success_and_magnitude_compare_mean_token_probabilities():
    # P[new] = 0.6 vs P[true] = 0.2, then 0.1 vs 0.5
    pairs = [(NLL(0.6), NLL(0.2)), (NLL(0.1), NLL(0.5))]
    assert success(pairs, new_wins=True) == 50.0
    assert success(pairs, new_wins=False) == 50.0
    assert magnitude(pairs, new_wins=True) == pytest.approx(100 * ((0.6 - 0.2) + (0.1 - 0.5)) / 2)
    assert magnitude([(NLL(0.1), NLL(0.5))], new_wins=False) == pytest.approx(40.0)


def test_record_values_of_a_known_record():
    # rewrite: new wins (0.7 vs 0.1); paraphrase: one of two; neighbourhood: true wins (0.8 vs 0.05)
    row = {"scores": {"rewrite": [[NLL(0.7), NLL(0.1), 1.0, 0.0]],
                      "paraphrase": [[NLL(0.3), NLL(0.4), 0.5, 0.0], [NLL(0.6), NLL(0.2), 1.0, 0.0]],
                      "neighborhood": [[NLL(0.05), NLL(0.8), 0.0, 1.0]]}}
    v = counterfact_record_values(row)
    assert v["ES"] == 100.0 and v["EM"] == pytest.approx(60.0)
    assert v["PS"] == 50.0 and v["PM"] == pytest.approx(100 * (-0.1 + 0.4) / 2)
    assert v["NS"] == 100.0 and v["NM"] == pytest.approx(75.0)
    assert v["ES_acc"] == 100.0 and v["PS_acc"] == 75.0 and v["NS_acc"] == 100.0
    assert "GE" not in v


def test_mean_ci_is_the_normal_interval():
    est = mean_ci([0, 100, 100, 100])  # mean 75, sd 50
    assert est.value == 75.0
    assert est.half_width == pytest.approx(1.959963984540054 * 50 / 2)
    assert mean_ci([42.0]).low == mean_ci([42.0]).high == 42.0
    with pytest.raises(ValueError):
        mean_ci([])


def test_score_is_the_harmonic_mean_and_its_interval_contains_it():
    es, ps, ns = [100] * 10, [100] * 5 + [0] * 5, [100] * 8 + [0] * 2
    est = score_ci(es, ps, ns, resamples=500, seed=1)
    assert est.value == pytest.approx(harmonic_mean([100, 50, 80]))
    assert harmonic_mean([100, 50, 80]) == pytest.approx(3 / (1 / 100 + 1 / 50 + 1 / 80))
    assert est.low <= est.value <= est.high and est.high - est.low > 0
    assert score_ci(es, ps, ns, resamples=500, seed=1) == est  # seeded
    assert score_ci([100] * 4, [0] * 4, [100] * 4).value == 0.0


def test_ngram_entropy_by_hand():
    # "a b a b": bigrams ab, ba, ab -> f = 2/3, 1/3
    assert ngram_entropy(["a", "b", "a", "b"], 2) == pytest.approx(-(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3))
    assert ngram_entropy(["a"], 2) == 0.0
    # four distinct words: 3 distinct bigrams (log2 3), 2 distinct trigrams (1 bit)
    assert generation_entropy("w x y z") == pytest.approx((2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2)
    # repetition lowers it
    assert generation_entropy("the cat the cat the cat the cat") < generation_entropy("the cat sat on a warm mat today")


def test_tfidf_similarity_and_consistency():
    sim = TfidfSimilarity(["Paris is in France", "Tokyo is in Japan", "Rome is in Italy"])
    assert sim("Paris France", "Paris France") == pytest.approx(1.0)
    assert sim("Paris France", "Tokyo Japan") == pytest.approx(0.0)
    recs = [CounterfactRecord(1, "Eiffel Tower", "{} is in", "Rome", "Paris", ("p",), ("n",)),
            CounterfactRecord(2, "Colosseum", "{} is located in", "Paris", "Rome", ("p",), ("n",)),
            CounterfactRecord(3, "Trevi Fountain", "{} stands in", "Paris", "Rome", ("p",), ("n",))]
    refs, source = reference_texts(recs, None)
    assert "dataset" in source
    assert refs["Rome"] == [("Colosseum", "Colosseum is located in Rome."), ("Trevi Fountain", "Trevi Fountain stands in Rome.")]
    tfidf = TfidfSimilarity([" ".join(t for _, t in v) for v in refs.values()])
    rome_like = consistency(["The Eiffel Tower is located in Rome, near the Colosseum."], "Eiffel Tower", "Rome",
                            refs, tfidf)
    paris_like = consistency(["The Eiffel Tower is a tower."], "Eiffel Tower", "Rome", refs, tfidf)
    assert rome_like > paris_like >= 0
    assert consistency(["x"], "Colosseum", "Paris", refs, tfidf) is not None  # from record 1's subject
    assert consistency(["x"], "Colosseum", "Madrid", refs, tfidf) is None  # no reference text
    np.testing.assert_allclose(tfidf("a", "a"), 0.0)  # out-of-vocabulary text has no vector
