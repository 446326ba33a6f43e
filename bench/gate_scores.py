"""The gated insert's own score s (1 at the rewrite prompt) at the paraphrases and the token-sharing neighbours
of tuning records: where the gate's thresholds τ₀ (closed below, exactly, after a band) and τ₁ (fully open)
should sit. No v* is computed: only the gate is fitted, as the insert fits it.

    python bench/gate_scores.py --n 40 --layer 3 --out reports/bench/gate-scores-l3.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from romeflow.engine import gated
from romeflow.engine.models import cache_dir, load_model
from romeflow.engine.prompts import subject_last_index
from romeflow.engine.rome import Rome
from romeflow.engine.statistics import get_stats
from romeflow.evaluation.datasets import records_with_token_neighbors
from romeflow.params import load_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    p = load_params(args.params)
    lm = load_model(p.model)
    stats = get_stats(lm, [args.layer], p.stats.corpus_source(), p.stats.tokens, cache_dir(), p.stats.seq_len)
    rome = Rome(lm, replace(p.rome, insert="gated", layer=args.layer), lambda l: stats[l].second_moment,
                Path(args.params).parent, corpus=p.stats.corpus_source())
    records = records_with_token_neighbors(p.bench.counterfact_records, lm.tokenizer, p.bench.token_neighbors_k,
                                           p.bench.token_neighbors_facts)[args.start:args.start + args.n]
    tok = lm.tokenizer
    out = {"paraphrase": [], "nstok": [], "layer": args.layer, "records": len(records)}
    for rec in records:
        gate = gated.fit_gate(rome, rec.request, args.layer, 0.15, 0.5, 1e-2)
        paras = [q for q in rec.paraphrases if rec.subject in q]
        texts = [q for q in paras] + [n.prompt for n in rec.token_neighbors]
        where = [subject_last_index(tok, q.replace(rec.subject, "{}", 1), rec.subject) for q in paras]
        where += [subject_last_index(tok, rec.relation, n.subject) for n in rec.token_neighbors]
        s = gate.score(gated.mlp_inputs(lm, args.layer, texts, where)).tolist()
        out["paraphrase"] += s[:len(paras)]
        out["nstok"] += s[len(paras):]
    q = lambda v, f: float(torch.quantile(torch.tensor(v), f))  # noqa: E731
    for name in ("paraphrase", "nstok"):
        v = out[name]
        print(f"{name:10s} n={len(v)}  p10 {q(v, .1):.2f}  p25 {q(v, .25):.2f}  median {q(v, .5):.2f}  "
              f"p75 {q(v, .75):.2f}  p90 {q(v, .9):.2f}")
    for t0 in (0.15, 0.3, 0.45, 0.6):
        soft = t0 - gated.SOFT
        print(f"closed below {soft:.2f} (τ₀ {t0}): NS_tok closed {sum(x <= soft for x in out['nstok']) / len(out['nstok']):.2f}, "
              f"paraphrases closed {sum(x <= soft for x in out['paraphrase']) / len(out['paraphrase']):.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
