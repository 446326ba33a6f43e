"""Sweep ROME's edit layer and hyper-parameters on COUNTERFACT dev records; choose by S, not efficacy.

Each record is edited alone on the base model (the weight is restored exactly from a copy after
each edit), then scored: ES (rewrite prompt), PS (paraphrases), NS (neighbourhood prompts), and
S = harmonic mean of the three. Results are appended to a JSONL file, so an interrupted sweep
continues where it stopped; a markdown summary is written at the end.

    python bench/sweep.py --layers 2,3,4,5,6,7,8 --n 30 --out docs/sweep/layers.jsonl
    python bench/sweep.py --layers 4 --set kl_factor=0.5 --set early_stop_nll=0.3 --n 30 --out ...
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from romeflow.config import load_settings
from romeflow.evaluation.scoring import harmonic_mean, load_counterfact, record_metrics, score_record
from romeflow.engine.models import cache_dir, load_model, weight_out_in
from romeflow.engine.rome import Rome, RomeParams, add_rank_one
from romeflow.engine.statistics import get_stats


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def config_id(params: RomeParams) -> str:
    return json.dumps(params.to_dict(), sort_keys=True)


def summarize(rows: list[dict]) -> dict:
    keys = ("ES", "PS", "NS", "EM", "PM", "NM")
    out = {k: statistics.fmean(r["post"][k] for r in rows) for k in keys}
    out["S"] = harmonic_mean([out["ES"], out["PS"], out["NS"]])
    out["seconds"] = statistics.fmean(r["seconds"] for r in rows)
    out["n"] = len(rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", default="../shared/data/counterfact-dev.json")
    ap.add_argument("--n", type=int, default=30, help="records, sampled with --sample-seed")
    ap.add_argument("--sample-seed", type=int, default=0)
    ap.add_argument("--layers", default=None, help="comma-separated; default params.yaml rome.layer")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="rome hyper-parameter key=value")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", required=True, help="JSONL results (appended, resumable)")
    ap.add_argument("--report", default=None, help="markdown summary [default: OUT with .md]")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    settings = load_settings(args.params)
    base = replace(settings.rome, **{k: parse_value(v) for k, v in (s.split("=", 1) for s in args.overrides)})
    layers = [int(x) for x in args.layers.split(",")] if args.layers else [base.layer]
    records = load_counterfact(args.records)
    records = random.Random(args.sample_seed).sample(records, min(args.n, len(records)))

    lm = load_model(args.model or settings.model)
    stats = get_stats(lm, layers, settings.stats.corpus_source(), settings.stats.tokens, cache_dir(),
                      settings.stats.seq_len)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["config"], r["case_id"]))
    pre_cache: dict[int, dict] = {}
    for layer in layers:
        params = replace(base, layer=layer)
        cid = config_id(params)
        editor = Rome(lm, params, lambda l: stats[l].second_moment)
        for i, rec in enumerate(records):
            if (cid, rec.case_id) in done:
                continue
            if rec.case_id not in pre_cache:
                pre_cache[rec.case_id] = record_metrics(score_record(lm, rec))
            t = time.perf_counter()
            result = editor.compute(rec.request, layer)
            seconds = time.perf_counter() - t
            w = weight_out_in(lm.model, result.update.module)
            saved = w.clone()
            add_rank_one(lm.model, result.update.module, result.update.u, result.update.v)
            post = record_metrics(score_record(lm, rec))
            w.copy_(saved)
            row = {"config": cid, "layer": layer, "case_id": rec.case_id, "pre": pre_cache[rec.case_id],
                   "post": post, "seconds": seconds, "steps": len(result.nll_trace) - 1,
                   "final_nll": result.nll_trace[-1], "timings": result.timings}
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"layer {layer} [{i + 1}/{len(records)}] case {rec.case_id}: ES {post['ES']:.0f} PS {post['PS']:.0f} "
                  f"NS {post['NS']:.0f} steps {len(result.nll_trace) - 1} {seconds:.1f}s", flush=True)

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_config: dict[str, list[dict]] = {}
    for r in rows:
        by_config.setdefault(r["config"], []).append(r)
    base_dict = RomeParams().to_dict()
    lines = ["| layer | changes vs defaults | n | S | ES | PS | NS | EM | PM | NM | s/edit |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    pre = summarize([{"post": r["pre"], "seconds": 0} for r in {r["case_id"]: r for r in rows}.values()])
    lines.append(f"| – | unedited | {pre['n']} | {pre['S']:.1f} | {pre['ES']:.1f} | {pre['PS']:.1f} | {pre['NS']:.1f} "
                 f"| {pre['EM']:.1f} | {pre['PM']:.1f} | {pre['NM']:.1f} | – |")
    for cid, rs in sorted(by_config.items(), key=lambda kv: json.loads(kv[0])["layer"]):
        cfg = json.loads(cid)
        changes = ", ".join(f"{k}={v}" for k, v in cfg.items() if k != "layer" and base_dict.get(k) != v) or "–"
        s = summarize(rs)
        lines.append(f"| {cfg['layer']} | {changes} | {s['n']} | {s['S']:.1f} | {s['ES']:.1f} | {s['PS']:.1f} | "
                     f"{s['NS']:.1f} | {s['EM']:.1f} | {s['PM']:.1f} | {s['NM']:.1f} | {s['seconds']:.1f} |")
    report = Path(args.report or out.with_suffix(".md"))
    report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
