"""Paired comparison of two methods in one `romeflow bench counterfact` run folder: S, S+ or one metric.

Both methods edited the same records, so the difference is bootstrapped over records jointly (one
resample of record ids feeds both methods): a 95% percentile interval of a − b.

    python bench/compare_s.py reports/bench/counterfact-dev200 rome ftl                  # S
    python bench/compare_s.py reports/bench/nstok-dev100 rome rome-r1 --metric S+
    python bench/compare_s.py reports/bench/nstok-dev100 rome rome-r1 --metric NS_tok
    python bench/compare_s.py reports/bench/counterfact-dev200-gated gated rome --b-folder reports/bench/counterfact-dev200-s6
        # b from another run folder over the same records (the same dataset and case ids, checked)

S = harmonic mean of the ES, PS, NS means; S+ adds NS_tok, whose mean (like any single metric's) is
over the records that have a value (records without token-sharing neighbours have none).
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np

from romeflow.evaluation.bench import Run, counterfact_record_values

COMPOSITES = {"S": ("ES", "PS", "NS"), "S+": ("ES", "PS", "NS", "NS_tok")}


def statistic(cols: np.ndarray, harmonic: bool) -> np.ndarray:
    """(c, R, n) per-record values (NaN: none) -> (R,): the harmonic mean of the column means, or the one mean."""
    means = np.nanmean(cols, -1)  # (c, R)
    if not harmonic:
        return means[0]
    ok = (means > 0).all(0)
    return np.where(ok, cols.shape[0] / (1.0 / np.where(ok, means, 1.0)).sum(0), 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--metric", default="S", help="S, S+, or a per-record metric such as NS_tok, PS, NS")
    ap.add_argument("--b-folder", help="b's run folder, when it is not FOLDER (same dataset and records)")
    ap.add_argument("--resamples", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    def run(folder: str) -> Run:
        return Run(Path(folder), json.loads((Path(folder) / "run.json").read_text()))

    run_a = run(args.folder)
    run_b = run(args.b_folder) if args.b_folder else run_a
    same = ("sha256", "case_ids_sha256")
    if [run_a.settings["dataset"][k] for k in same] != [run_b.settings["dataset"][k] for k in same]:
        raise SystemExit(f"{args.b_folder}: another dataset or other records than {args.folder}")
    rows_a, rows_b = run_a.done(args.a), run_b.done(args.b)
    ids = sorted(set(rows_a) & set(rows_b))
    keys = COMPOSITES.get(args.metric, (args.metric,))
    cols = {m: np.array([[counterfact_record_values(rows[i]).get(k, np.nan) for i in ids] for k in keys])
            for m, rows in ((args.a, rows_a), (args.b, rows_b))}  # (c, n)
    harmonic = args.metric in COMPOSITES
    point = {m: float(statistic(c[:, None, :], harmonic)[0]) for m, c in cols.items()}
    rng = np.random.default_rng(args.seed)
    idx = rng.integers(0, len(ids), size=(args.resamples, len(ids)))  # (R, n)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample may hold no record with a value
        diff = statistic(cols[args.a][:, idx], harmonic) - statistic(cols[args.b][:, idx], harmonic)  # (R,)
    diff = diff[~np.isnan(diff)]
    low, high = np.percentile(diff, [2.5, 97.5])
    out = {"records": len(ids), "metric": args.metric, args.metric: point, "difference": point[args.a] - point[args.b],
           "ci95": [float(low), float(high)], "share_of_resamples_a_wins": float((diff > 0).mean()),
           "resamples": args.resamples, "seed": args.seed}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
