"""Paired comparison of two compositions of one `romeflow bench stack` run: a metric of the k edited
records on stack a minus on stack b, bootstrapped over the records jointly (one resample of record ids
feeds both), a 95% percentile interval.

    python bench/compare_stack.py reports/bench/stack-dev300 cal3 rdg3 --k 300 --metric PS
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from romeflow.evaluation.bench import counterfact_record_values


def per_record(folder: Path, method: str, k: int, metric: str) -> dict[int, float]:
    rows = json.loads((folder / "rows" / f"{method}-k{k}.json").read_text())
    if "error" in rows:
        raise SystemExit(f"{folder}/rows/{method}-k{k}.json: {rows['error']}")
    out = {}
    for r in rows["edited"]:
        v = counterfact_record_values(r)
        if metric in v:
            out[r["case_id"]] = v[metric]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--k", type=int, required=True)
    ap.add_argument("--metric", default="PS", help="ES, PS, NS or NS_tok")
    ap.add_argument("--resamples", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    a, b = (per_record(args.folder, m, args.k, args.metric) for m in (args.a, args.b))
    ids = sorted(set(a) & set(b))
    if not ids:
        raise SystemExit("no record has the metric in both compositions")
    diff = np.array([a[i] - b[i] for i in ids])  # (n,)
    rng = np.random.default_rng(args.seed)
    boot = diff[rng.integers(0, len(ids), (args.resamples, len(ids)))].mean(1)  # (R,)
    low, high = np.percentile(boot, [2.5, 97.5])
    print(json.dumps({"a": args.a, "b": args.b, "k": args.k, "metric": args.metric, "n": len(ids),
                      "a_mean": float(np.mean([a[i] for i in ids])), "b_mean": float(np.mean([b[i] for i in ids])),
                      "difference": float(diff.mean()), "ci95": [float(low), float(high)]}))


if __name__ == "__main__":
    main()
