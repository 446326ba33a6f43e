"""The paper's metrics as pure functions of scores and texts (no model here).

- Probability metrics compare two targets by mean per-token NLL: P = exp(−NLL).
- Means come with a 95% normal-approximation interval over records; S (a harmonic mean of three
  means) with a seeded percentile bootstrap over records.
- GE: weighted mean of bi- and tri-gram entropies of generated text (fluency).
- RS: TF-IDF cosine between generated text and reference text about the new object (consistency).
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal


@dataclass(frozen=True)
class Estimate:
    """A mean over records (in %, or GE's units) with its 95% confidence interval."""

    value: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def to_dict(self) -> dict:
        return {"value": self.value, "ci95": [self.low, self.high], "n": self.n}


def mean_ci(values) -> Estimate:
    """Mean ± 1.96 · sd / √n (sd with n − 1); a single value has a zero-width interval."""
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values to average")
    mean = float(x.mean())
    half = Z95 * float(x.std(ddof=1)) / math.sqrt(x.size) if x.size > 1 else 0.0
    return Estimate(mean, mean - half, mean + half, int(x.size))


def wilson_ci(successes: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion, in %: for the few prompts of one manifest."""
    if n <= 0:
        raise ValueError("no trials")
    p, z2 = successes / n, Z95 ** 2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


def harmonic_mean(values) -> float:
    values = list(values)
    return 0.0 if any(v <= 0 for v in values) else len(values) / sum(1.0 / v for v in values)


def score_ci(es, ps, ns, resamples: int = 1000, seed: int = 0, extra=()) -> Estimate:
    """S = harmonic mean of the ES, PS and NS means, with a percentile bootstrap over records.

    es, ps, ns: per-record success values (%), aligned by record. ``extra``: more such columns
    (S+ adds NS_tok), where NaN marks a record without a value: each column's mean is over the
    records that have one, in the point estimate and in every resample.
    """
    cols = np.asarray([list(es), list(ps), list(ns)] + [list(c) for c in extra], dtype=np.float64)  # (c, n)
    n = cols.shape[1]
    point = harmonic_mean(np.nanmean(cols, 1).tolist())
    if n < 2:
        return Estimate(point, point, point, n)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))  # (R, n)
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample may hold no record with a value
        means = np.nanmean(cols[:, idx], 2)  # (c, R)
        ok = (means > 0).all(0)  # NaN compares False
        boot = np.where(ok, cols.shape[0] / (1.0 / np.where(ok, means, 1.0)).sum(0), 0.0)  # (R,)
    low, high = np.percentile(boot, [2.5, 97.5])
    return Estimate(point, float(low), float(high), n)


# --------------------------------------------------------------------------------------------------
# Per-record COUNTERFACT values from (NLL new, NLL true) pairs
# --------------------------------------------------------------------------------------------------


def success(pairs: list[tuple[float, float]], new_wins: bool) -> float:
    """% of prompts where P[new] > P[true] (new_wins) or P[true] > P[new]; pairs are (NLL new, NLL true)."""
    return 100.0 * sum((a < b) if new_wins else (b < a) for a, b in pairs) / len(pairs)


def magnitude(pairs: list[tuple[float, float]], new_wins: bool) -> float:
    """Mean of P[new] − P[true] (or its negative), in percentage points."""
    diffs = [math.exp(-a) - math.exp(-b) for a, b in pairs]
    return 100.0 * sum(d if new_wins else -d for d in diffs) / len(diffs)


# --------------------------------------------------------------------------------------------------
# GE: n-gram entropy of generated text
# --------------------------------------------------------------------------------------------------

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngram_entropy(tokens: list[str], n: int) -> float:
    """−Σ f log₂ f over the relative frequencies f of the text's n-grams (0 if it has none)."""
    grams = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    total = sum(grams.values())
    return -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0


def generation_entropy(text: str) -> float:
    """The paper's fluency of one text: (2/3 · H₂ + 4/3 · H₃) / 2, bi- and tri-gram entropies in bits."""
    tokens = words(text)
    return (2 / 3 * ngram_entropy(tokens, 2) + 4 / 3 * ngram_entropy(tokens, 3)) / 2


# --------------------------------------------------------------------------------------------------
# RS: TF-IDF similarity to reference text about the new object
# --------------------------------------------------------------------------------------------------


class TfidfSimilarity:
    """Cosine similarity in a TF-IDF space fitted once on a reference corpus (documents = texts)."""

    def __init__(self, corpus: list[str]):
        from sklearn.feature_extraction.text import TfidfVectorizer

        if not corpus:
            raise ValueError("the TF-IDF reference corpus is empty")
        self._vectorizer = TfidfVectorizer(lowercase=True).fit(corpus)

    def __call__(self, a: str, b: str) -> float:
        """Cosine of the two texts' (L2-normalised) TF-IDF vectors, in [0, 1]."""
        va, vb = self._vectorizer.transform([a, b])
        return float(va.multiply(vb).sum())
