"""Which share of an edit's change reaches paraphrases and which reaches the subject's family, by insert.

For the first N dev records with token-sharing neighbours, the insert's direction v (Δ = δ vᵀ, scaled so
that vᵀk_d = 1; it does not depend on v*) is computed for several inserts, and its share at

- the subject's key in the record's paraphrase prompt (a diagnostic only: the editor never sees it),
- each NS_tok neighbour's key (its last subject token, in the record's relation),
- the keys of v*'s context prefixes (what k* averages),
- every other token of the neighbours' prompts (the largest |share| per prompt, <bos> left out),

with the update's energy on generic text, vᵀCv, against the rank-one insert's. An insert that gives the
paraphrases their full share and the family a small one is what entity-level specificity needs.

Inserts: the family term at α (``a<α>``: C + αF̃, no energy budget), ``+pk`` the prompt key, ``+prefixes``
every context prefix's key (``prefix_keys``), ``+centroid`` the family's mean key held (``centroid``): the
options of inserts.InsertSpec, measured one at a time (docs/specificity.md).

    python bench/leak_shares.py --n 100 --alphas 0,0.03,0.3 --out reports/bench/leak-shares.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from romeflow.evaluation.datasets import records_with_token_neighbors
from romeflow.engine.models import cache_dir, keys_at, load_model
from romeflow.engine.prompts import encode, subject_last_index
from romeflow.params import load_params
from romeflow.engine.protect import bare_keys
from romeflow.engine import inserts
from romeflow.engine.rome import Rome, insert_many, subject_keys
from romeflow.engine.statistics import get_stats


def family_factor(rome: Rome, layer: int, subject: str, template: str | None) -> torch.Tensor | None:
    """inserts.family_factor, with the family's keys taken in ``template`` (None: bare, as the editor does)."""
    if template is None:
        return inserts.family_factor(rome, layer, subject)
    names = inserts.family(rome, subject)
    if not names:
        return None
    keys = bare_keys(rome.lm, layer, names, template=template).double()  # (f, d_in)
    trace_c = rome._second_moment(layer).double().diagonal().sum()
    return keys.T * (trace_c / ((keys * keys).sum() / len(names)) / len(names)).sqrt()


def direction(rome: Rome, layer: int, keys: torch.Tensor, alpha: float,
              subject: str, ridge: float, template: str | None = None,
              protected: torch.Tensor | None = None) -> torch.Tensor:
    """v (d_in,) with vᵀk = 1 for each of ``keys`` (n, d_in) and vᵀk = 0 for the protected ones, least
    vᵀ(C + αF̃)v."""
    solve = rome.solver(layer)
    if alpha > 0:
        family = family_factor(rome, layer, subject, template)
        if family is not None:
            solve = inserts.WoodburySolver(rome.solver(layer), family, alpha)
    ones = torch.ones(keys.shape[0], 1)
    n = keys.shape[0] + (0 if protected is None else protected.shape[0])
    _, v = insert_many(solve, keys, ones, None, protected, ridge if n > 1 else 0.0, 0.0)
    return v.sum(1)  # every column asks for the same change: one direction


def main() -> None:  # noqa: C901 - one measurement, top to bottom
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--alphas", default="0,0.3,1,3")
    ap.add_argument("--ridge", type=float, default=1e-6)
    ap.add_argument("--layer", type=int, default=None, help="default: params.yaml's rome.layer")
    ap.add_argument("--family-in-relation", action="store_true",
                    help="the family term's keys in the record's relation, not bare")
    ap.add_argument("--first-word-siblings", action="store_true",
                    help="made-up siblings replace the subject's first word only (not every word but the last)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    p = load_params(args.params)
    root = Path(args.params).resolve().parent
    lm = load_model(p.model)
    layer = p.rome.layer if args.layer is None else args.layer
    facts = root / p.bench.token_neighbors_facts if p.bench.token_neighbors_facts else None
    records = records_with_token_neighbors(root / p.bench.counterfact_records, lm.tokenizer,
                                           p.bench.token_neighbors_k, facts)[:args.n]
    stats = get_stats(lm, [layer], p.stats.corpus_source(), p.stats.tokens, cache_dir(None), p.stats.seq_len)
    c = stats[layer].second_moment.double()
    rome = Rome(lm, replace(p.rome, protect_siblings=64), lambda _: stats[layer].second_moment, root)
    prefixes = rome.prefixes
    if args.first_word_siblings:
        import random

        def family(subject: str) -> list[str]:
            names = rome.names().sharing(lm.tokenizer, subject)[:256]
            words = subject.split()
            article = [words.pop(0)] if len(words) > 1 and words[0] in ("The", "the", "A", "An") else []
            if len(words) < 2:
                return names
            pool = sorted({w for ws in rome.names().by_token.values() for name in ws
                           if (w := name.split()[0]).isalpha() and w[:1].isupper() and w not in words})
            picked = random.Random(f"{p.rome.seed}:{subject}").sample(pool, min(64, len(pool)))
            siblings = [" ".join(article + [w] + words[1:]) for w in picked]
            return names + [s for s in siblings if s != subject and s not in names]

        inserts.family = lambda _rome, subject: family(subject)  # (this script's own siblings)
    variants = [(f"a{a}{suffix}", float(a), suffix) for a in args.alphas.split(",")
                for suffix in ("", "+pk", "+prefixes", "+prefixes+centroid")]
    rows = {name: {"para": [], "family": [], "prefix": [], "energy": [], "other": []} for name, _, _ in variants}
    for i, r in enumerate(records):
        k_all = subject_keys(lm, layer, [x + "{}" for x in prefixes], r.subject)  # (P, d_in)
        k_star = k_all.mean(0)
        k_p = subject_keys(lm, layer, [r.relation], r.subject)  # (1, d_in) the rewrite prompt's key
        para = [x for x in r.paraphrases if r.subject in x]
        k_para = subject_keys(lm, layer, [x.replace(r.subject, "{}", 1) for x in para], r.subject) if para else None
        k_fam = bare_keys(lm, layer, [n.subject for n in r.token_neighbors], template=r.relation)  # (m, d_in)
        # every token of the neighbours' prompts but their last subject token (and <bos>): the relation's
        batch = encode(lm.tokenizer, [n.prompt for n in r.token_neighbors])
        k_tok = keys_at(lm.model, [layer], batch.input_ids, batch.attention_mask)[layer].double()  # (m, T, d_in)
        other_mask = batch.attention_mask.bool().clone()
        other_mask[:, 0] = False
        for j, n in enumerate(r.token_neighbors):
            other_mask[j, subject_last_index(lm.tokenizer, r.relation, n.subject)] = False
        v0 = direction(rome, layer, k_star[None], 0.0, r.subject, args.ridge).double()
        v0 = v0 / (v0 @ k_star.double())  # the rank-one insert's: energies are relative to it
        for name, alpha, suffix in variants:
            keys = k_star[None] if not suffix else (torch.cat([k_star[None], k_p]) if suffix == "+pk"
                                                    else torch.cat([k_all, k_p]))  # (k* is k_all's mean)
            protected = None
            names = [n for n in inserts.family(rome, r.subject) if n != r.subject]
            held = []
            if "centroid" in suffix and names:  # the family's mean key held fixed (one more constraint)
                held.append(rome.bare_keys(layer, names).mean(0, keepdim=True))
            protected = torch.cat(held) if held else None
            v = direction(rome, layer, keys, alpha, r.subject, args.ridge,
                          r.relation if args.family_in_relation else None, protected).double()
            v = v / (v @ k_star.double())
            v0 = v if v0 is None else v0
            row = rows[name]
            if k_para is not None:
                row["para"] += (k_para.double() @ v).tolist()
            row["family"] += (k_fam.double() @ v).tolist()
            row["other"] += (k_tok @ v).abs().masked_fill(~other_mask, 0).amax(1).tolist()  # per neighbour prompt
            row["prefix"] += (k_all.double() @ v).tolist()
            row["energy"].append(float(v @ c @ v / (v0 @ c @ v0)))
        print(f"{i + 1}/{len(records)}", flush=True, end="\r")
    print()
    print("| insert | paraphrase share (mean, min 10%) | family share (mean, median) | prefix share (mean, min) "
          "| energy × (median) | largest share at another token (mean) |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for name, row in rows.items():
        q = lambda xs, f: statistics.quantiles(xs, n=10)[0] if f == "p10" else None  # noqa: E731
        s = {"para_mean": statistics.mean(row["para"]), "para_p10": q(row["para"], "p10"),
             "family_mean": statistics.mean(row["family"]), "family_median": statistics.median(row["family"]),
             "prefix_mean": statistics.mean(row["prefix"]), "prefix_min": min(row["prefix"]),
             "energy_median": statistics.median(row["energy"]), "other_mean": statistics.mean(row["other"])}
        summary[name] = s
        print(f"| {name} | {s['para_mean']:.3f}, {s['para_p10']:.3f} | {s['family_mean']:.3f}, {s['family_median']:.3f} "
              f"| {s['prefix_mean']:.3f}, {s['prefix_min']:.3f} | {s['energy_median']:.2f} | {s['other_mean']:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"n": len(records), "layer": layer, "ridge": args.ridge,
                                              "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
