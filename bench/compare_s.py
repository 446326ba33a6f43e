"""Paired comparison of two methods' S in one `romeflow bench counterfact` run folder.

Both methods edited the same records, so the difference of their S is bootstrapped over records
jointly (one resample of record ids feeds both methods): a 95% percentile interval of S_a − S_b.

    python bench/compare_s.py reports/bench/counterfact-dev200 rome ftl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from romeflow.bench import Run, counterfact_record_values
from romeflow.metrics import harmonic_mean


def s_of(cols: np.ndarray) -> np.ndarray:  # (3, R, n) per-record ES/PS/NS -> (R,) S of each resample
    means = cols.mean(-1)  # (3, R)
    with np.errstate(divide="ignore"):
        return np.where((means > 0).all(0), 3.0 / (1.0 / means).sum(0), 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--resamples", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    run = Run(Path(args.folder), json.loads((Path(args.folder) / "run.json").read_text()))
    rows_a, rows_b = run.done(args.a), run.done(args.b)
    ids = sorted(set(rows_a) & set(rows_b))
    cols = {m: np.array([[counterfact_record_values(rows[i])[k] for i in ids] for k in ("ES", "PS", "NS")])
            for m, rows in ((args.a, rows_a), (args.b, rows_b))}  # (3, n)
    point = {m: harmonic_mean(c.mean(1).tolist()) for m, c in cols.items()}
    rng = np.random.default_rng(args.seed)
    idx = rng.integers(0, len(ids), size=(args.resamples, len(ids)))  # (R, n)
    diff = s_of(cols[args.a][:, idx]) - s_of(cols[args.b][:, idx])  # (R,)
    low, high = np.percentile(diff, [2.5, 97.5])
    out = {"records": len(ids), "S": point, "difference": point[args.a] - point[args.b],
           "ci95": [float(low), float(high)], "share_of_resamples_a_wins": float((diff > 0).mean()),
           "resamples": args.resamples, "seed": args.seed}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
