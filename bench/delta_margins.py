"""How much of its change an edit needs: for each delta of a `romeflow bench stack` run folder, alone
on the base model, the rewrite prompt's margin (mean per-token log P(new) − log P(old)) with the
update scaled to shares 0.1, 0.2, …, 1.0 of itself (`margins.margin_under`). Prints the quantiles of the
margin of the whole update and, per share, how many edits it already flips; writes the grid as JSON.

    python bench/delta_margins.py reports/bench/stack-dev300 --n 300 --out reports/bench/stack-dev300/margins.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from romeflow.evaluation.datasets import load_counterfact
from romeflow.pipeline.deltas import load_delta
from romeflow.engine.models import load_model, read_weight, write_weight
from romeflow.engine.margins import margin_under

SHARES = [i / 10 for i in range(1, 11)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--n", type=int, required=True, help="the first N records of the run")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    run = json.loads((args.folder / "run.json").read_text())
    records = load_counterfact(run["dataset"]["path"])[:args.n]
    lm = load_model(run["model"]["name"])
    if lm.fingerprint != run["model"]["fingerprint"]:
        raise SystemExit(f"{args.folder}: the run's model is {run['model']['fingerprint'][:12]}, this one {lm.fingerprint[:12]}")
    grid = {}
    for rec in records:
        d = load_delta(args.folder / "deltas" / f"{int(rec.case_id)}.safetensors")
        (up,) = d.updates
        w0 = read_weight(lm.model, up.module)
        try:
            margin = margin_under(lm, up.module, up.u, up.v, rec.prompt, rec.target_new, rec.target_true)
            grid[rec.case_id] = [margin(s) for s in SHARES]
        finally:
            write_weight(lm.model, up.module, w0)
    whole = [m[-1] for m in grid.values()]
    deciles = statistics.quantiles(whole, n=10)
    print(f"{len(grid)} deltas; margin of the whole update: median {statistics.median(whole):.2f}, "
          f"10th percentile {deciles[0]:.2f}, 90th {deciles[-1]:.2f} nats")
    for j, s in enumerate(SHARES):
        print(f"share {s:.1f}: {100 * sum(m[j] > 0 for m in grid.values()) / len(grid):.1f}% of the edits hold")
    args.out.write_text(json.dumps({"shares": SHARES, "margins": grid}, indent=1) + "\n")


if __name__ == "__main__":
    main()
