"""How much of a rank-one edit reaches the subjects that share the edited subject's last token, by layer.

For the first N dev records with token-sharing neighbours (the NS_tok neighbours of `romeflow bench`),
at each layer l: k* (prefix-averaged, Eq. 3) and each neighbour's key k_j (at its last subject token,
in the record's relation), and the leak of the rank-one update

    ρ_j = (C⁻¹k*)ᵀ k_j / (C⁻¹k*)ᵀ k*        (Δ k_j = ρ_j · (v* − W k*))

No v* is needed, so this is cheap: it tells whether a layer separates a family before any edit is run.

    python bench/leak_by_layer.py --layers 1,2,3,4,6,9 --n 100      # run from the repository root
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from romeflow.evaluation.datasets import records_with_token_neighbors
from romeflow.engine.models import cache_dir, load_model
from romeflow.params import load_params
from romeflow.engine.protect import bare_keys
from romeflow.engine.rome import Solver, context_prefixes, key
from romeflow.engine.statistics import get_stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="1,2,3,4")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    torch.set_num_threads(1)
    layers = [int(x) for x in args.layers.split(",")]
    p = load_params(args.params)
    root = Path(args.params).resolve().parent
    lm = load_model(p.model)
    facts = root / p.bench.token_neighbors_facts if p.bench.token_neighbors_facts else None
    records = records_with_token_neighbors(root / p.bench.counterfact_records, lm.tokenizer,
                                           p.bench.token_neighbors_k, facts)[:args.n]
    stats = get_stats(lm, layers, p.stats.corpus_source(), p.stats.tokens, cache_dir(None), p.stats.seq_len)
    prefixes = context_prefixes(lm, p.rome)
    print("| layer | neighbours | mean ρ | median ρ | share with ρ > 0.5 |\n|---|---|---|---|---|")
    for layer in layers:
        solve = Solver(stats[layer].second_moment)
        rhos = []
        for r in records:
            k_star = key(lm, layer, r.subject, prefixes)  # (d_in,)
            direction = solve(k_star)  # (d_in,) C⁻¹k*
            k_n = bare_keys(lm, layer, [n.subject for n in r.token_neighbors], template=r.relation)  # (m, d_in)
            rhos += ((k_n @ direction) / (k_star @ direction)).tolist()
        print(f"| {layer} | {len(rhos)} | {statistics.mean(rhos):.3f} | {statistics.median(rhos):.3f} | "
              f"{sum(x > 0.5 for x in rhos) / len(rhos):.2f} |", flush=True)


if __name__ == "__main__":
    main()
