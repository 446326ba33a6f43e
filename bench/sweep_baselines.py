"""Small dev sweep of the baselines' hyper-parameters (FT, FT+L, KN), by S on COUNTERFACT dev records.

Uses dev records *after* the benchmark's first 200 (default: records 200..209), no generation.

    python bench/sweep_baselines.py --records ../shared/data/counterfact-dev.json --start 200 --n 10 \
        --out docs/sweep/baselines.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from romeflow.evaluation.bench import counterfact_record_values, score_counterfact
from romeflow.evaluation.datasets import load_counterfact
from romeflow.engine.editors import FineTune, FtParams, KnowledgeNeurons, KnParams
from romeflow.evaluation.metrics import harmonic_mean
from romeflow.engine.models import load_model

CONFIGS = [
    ("ft", FtParams(layer=1, lr=5e-4)),
    ("ft", FtParams(layer=6, lr=5e-4)),
    ("ftl", FtParams(layer=1, lr=5e-4, linf=5e-4)),
    ("ftl", FtParams(layer=1, lr=5e-4, linf=1e-4)),
    ("kn", KnParams(ig_steps=5, scale=0.5)),
    ("kn", KnParams(ig_steps=5, scale=1.0)),
    ("kn", KnParams(ig_steps=5, scale=2.0)),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", required=True)
    ap.add_argument("--start", type=int, default=200)
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    records = load_counterfact(args.records)[args.start:args.start + args.n]
    lm = load_model()
    out = Path(args.out)
    done = {json.loads(line)["config"] for line in out.read_text().splitlines()} if out.exists() else set()
    for name, params in CONFIGS:
        key = json.dumps({"method": name, **params.to_dict()}, sort_keys=True)
        if key in done:
            continue
        editor = FineTune(lm, params, name) if name in ("ft", "ftl") else KnowledgeNeurons(lm, params)
        values, seconds = [], []
        for rec in records:
            t0 = time.perf_counter()
            edit = editor.edit(rec.request)
            seconds.append(time.perf_counter() - t0)
            values.append(counterfact_record_values(score_counterfact(lm, rec, None, rec.case_id)))
            edit.restore(lm.model)
        mean = {k: sum(v[k] for v in values) / len(values) for k in ("ES", "PS", "NS", "EM", "PM", "NM")}
        row = {"config": key, "n": len(values), "S": harmonic_mean([mean["ES"], mean["PS"], mean["NS"]]),
               **mean, "seconds_per_edit": sum(seconds) / len(seconds)}
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
