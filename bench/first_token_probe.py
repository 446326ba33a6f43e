"""Experiment (not a romeflow option): the rank-one edit written at the subject's FIRST token instead of
its last, to see whether a distinctive token ("Stanford" rather than " University") separates a family.

The engine finds the edited position with ``prompts.subject_last_index``; this script replaces it, in
the two modules that use it, by the index of the first subject token, then edits and scores records
one at a time as `romeflow bench` does (ES, PS, NS, NS_tok per record, and their means).

    python bench/first_token_probe.py --n 16                 # the first 16 tuning records
    python bench/first_token_probe.py --n 16 --position last # the same records, the engine as shipped
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from dataclasses import replace

import romeflow.engine.protect as protect_module
import romeflow.engine.rome as rome_module
from romeflow.evaluation.bench import counterfact_record_values, score_counterfact
from romeflow.evaluation.datasets import records_with_token_neighbors
from romeflow.engine.editors import RomeEditor
from romeflow.engine.models import cache_dir, load_model
from romeflow.params import load_params
from romeflow.engine.statistics import get_stats


def first_subject_index(tokenizer, template: str, subject: str) -> int:
    """Position of the first subject token in ``tokenizer(fill(template, subject))``."""
    head = template[: template.index("{}")]
    if not head.strip():
        return len(tokenizer("").input_ids)  # right after <bos> (0 for a model without one)
    return len(tokenizer(head.rstrip()).input_ids)  # the space before the subject is part of its token


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--position", choices=["first", "last"], default="first")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.position == "first":
        rome_module.subject_last_index = first_subject_index
        protect_module.subject_last_index = first_subject_index
    p = load_params(args.params)
    root = Path(args.params).resolve().parent
    lm = load_model(p.model)
    facts = root / p.bench.token_neighbors_facts if p.bench.token_neighbors_facts else None
    records = records_with_token_neighbors(root / p.bench.counterfact_records, lm.tokenizer,
                                           p.bench.token_neighbors_k, facts)[args.start:args.start + args.n]
    stats = get_stats(lm, [p.rome.layer], p.stats.corpus_source(), p.stats.tokens, cache_dir(None), p.stats.seq_len)
    editor = RomeEditor(lm, replace(p.rome, insert="rank-one"), lambda layer: stats[layer].second_moment)
    values = []
    for rec in records:
        edit = editor.edit(rec.request)
        try:
            row = score_counterfact(lm, rec, None, rec.case_id)
        finally:
            edit.restore(lm.model)
        values.append(counterfact_record_values(row))
        print(rec.subject, {k: round(values[-1][k], 1) for k in ("ES", "PS", "NS", "NS_tok") if k in values[-1]},
              flush=True)
    for k in ("ES", "PS", "NS", "NS_tok"):
        xs = [v[k] for v in values if k in v]
        print(f"{k}: {sum(xs) / len(xs):.1f} over {len(xs)} records")


if __name__ == "__main__":
    main()
