"""How the MLP window changes the traced layer: MLP indirect effects at the last subject token with
windows of 1 and 4 layers (the trace stage uses 10), on the facts the trace stage averaged.

Reads the known_ids from reports/trace/average.json (so no fact is checked again), traces only the
MLP restorations at the last subject token, and writes docs/tracing/mlp_windows.json. A benchmark,
never an assertion. Usage: python bench/trace_windows.py [--windows 1,4] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from romeflow.config import load_settings
from romeflow.io import write_json_atomic
from romeflow.engine.models import load_model
from romeflow.tracing import causal as tr


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", default="1,4")
    ap.add_argument("--out", default="docs/tracing/mlp_windows.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    settings = load_settings("params.yaml", resolve_auto=False)
    avg = json.loads((Path(settings.trace.out) / "average.json").read_text())
    facts = {f.known_id: f for f in tr.load_facts(settings.trace.facts)}
    lm = load_model(settings.model)
    std = tr.embedding_std(lm)
    windows = [int(w) for w in args.windows.split(",")]
    per_window = {w: [] for w in windows}
    t0 = time.perf_counter()
    for i, kid in enumerate(avg["known_ids"]):
        f = facts[kid]
        p = tr.make_prompt(lm, f.prompt, f.subject, f.attribute)
        runs = tr.clean_and_corrupted(lm, p, std, settings.trace)
        for w in windows:
            params = replace(settings.trace, window=w)
            restores = [tr.Restore("mlp", p.last_subject, l) for l in range(lm.num_layers)]
            ie = tr.restored_probs(lm, runs, restores, params) - runs.p_corrupted.mean()
            per_window[w].append(ie.tolist())
        print(f"{i + 1}/{len(avg['known_ids'])} {time.perf_counter() - t0:.0f} s", flush=True)
    out = {"facts": len(avg["known_ids"]), "params": settings.trace.method(), "seconds": time.perf_counter() - t0,
           "windows": {}}
    for w, rows in per_window.items():
        curve = [tr.mean_ci([r[l] for r in rows]) for l in range(lm.num_layers)]
        peak = max(range(lm.num_layers), key=lambda l: curve[l][0])
        out["windows"][str(w)] = {"mean": [m for m, _ in curve], "ci95": [c for _, c in curve], "peak_layer": peak}
    write_json_atomic(args.out, out)
    for w, c in out["windows"].items():
        print(f"window {w}: peak layer {c['peak_layer']}, AIE " +
              " ".join(f"{100 * m:.1f}" for m in c["mean"]))


if __name__ == "__main__":
    main()
