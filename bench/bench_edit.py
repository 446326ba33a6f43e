"""Benchmark the engine on the default model: load time, statistics throughput, per-edit time, delta size.

    python bench/bench_edit.py [--manifest edits/counterfact10.yaml] [--stats-tokens 20000] [--out docs/bench.json]
    python bench/bench_edit.py --variant r1:insert=rank-one ...   # also time variants, in one run, edits interleaved

Per-edit wall time is broken down into context prefixes (first edit only: they are cached), k*, v*
and the insert. Statistics throughput is measured on a fresh computation (a temporary cache), so a
cached result does not flatter it. Nothing here is asserted: it reports.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dataclasses import replace

from romeflow.config import load_settings
from romeflow.engine.editors import rome_variant
from romeflow.pipeline.deltas import compute_delta, save_delta
from romeflow.pipeline.manifests import load_manifest
from romeflow.engine.models import cache_dir, load_model
from romeflow.engine.rome import Rome
from romeflow.engine.statistics import get_stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", default="edits/counterfact10.yaml")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--stats-tokens", type=int, default=20_000, help="tokens for the throughput measurement")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="also write the numbers as JSON here")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:key=value[:key=value]",
                    help="also time ROME with these hyper-parameters (as `romeflow bench --variant`); each "
                         "manifest edit is timed under every configuration before the next, so that machine "
                         "load affects them alike")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = load_settings(args.params)
    report: dict = {"threads": args.threads, "machine": platform.processor() or platform.machine(),
                    "torch": torch.__version__}

    load_model(settings.model)  # make sure the converted copy exists before timing a load
    t = time.perf_counter()
    lm = load_model(settings.model)
    report["model_load_s"] = time.perf_counter() - t

    layer = settings.rome.layer
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        get_stats(lm, [layer], settings.stats.corpus_source(), args.stats_tokens, Path(tmp), settings.stats.seq_len,
                  progress=False)
        report["stats_tokens_per_s"] = args.stats_tokens / (time.perf_counter() - t)

    stats = get_stats(lm, [layer], settings.stats.corpus_source(), settings.stats.tokens, cache_dir(),
                      settings.stats.seq_len)
    manifest = load_manifest(args.manifest)
    configs = [("default", settings.rome)] + [rome_variant(v, settings.rome) for v in args.variant]
    for name, params in configs[1:]:
        if params.layer != layer:
            stats.update(get_stats(lm, [params.layer], settings.stats.corpus_source(), settings.stats.tokens,
                                   cache_dir(), settings.stats.seq_len))
    editors = {name: Rome(lm, params, lambda l: stats[l].second_moment, Path(args.params).parent)
               for name, params in configs}  # each caches its prefixes (first edit), solvers, names, keys
    timed: dict[str, list[dict]] = {name: [] for name, _ in configs}
    for edit in manifest.edits:  # each edit under every configuration in turn, on the base model
        for name, params in configs:
            r = editors[name].compute(edit.request, manifest.layer_of(edit, params.layer))
            timed[name].append({"total_s": sum(r.timings.values()), **r.timings, "steps": len(r.nll_trace) - 1,
                                "protected": len(r.protected)})
    per_edit = timed["default"]
    report["manifest_wall_s"] = sum(e["total_s"] for e in per_edit)
    if len(configs) > 1:
        report["variants"] = {name: {"hyperparameters": params.to_dict(), "per_edit": timed[name],
                                     "mean_edit_s": statistics.fmean(e["total_s"] for e in timed[name]),
                                     "mean_insert_s": statistics.fmean(e["insert"] for e in timed[name])}
                              for name, params in configs}
    one = replace(manifest, edits=manifest.edits[:1])  # a one-edit manifest: the size of its delta file
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "delta.safetensors"
        delta = compute_delta(lm, one, settings.rome, stats, root=Path(args.params).parent)
        save_delta(path, delta)
        size = path.stat().st_size
    up = delta.updates[0]
    d_in, d_out = (up.v.numel(), up.u.numel()) if hasattr(up, "u") else (up.gate.numel() + (0 if up.up is None else
                                                                                            up.up.numel()), up.down.numel())
    report.update({"edits": len(per_edit), "per_edit": per_edit,
                   "mean_edit_s": statistics.fmean(e["total_s"] for e in per_edit),
                   "mean_value_s": statistics.fmean(e["value"] for e in per_edit),
                   "mean_steps": statistics.fmean(e["steps"] for e in per_edit),
                   "delta_bytes_one_edit": size, "delta_bytes_per_edit": size,
                   "delta_budget_per_edit": (d_in + d_out) * 4 + 4096})

    print(f"model load from cache : {report['model_load_s']:.1f} s")
    print(f"statistics            : {report['stats_tokens_per_s']:.0f} tokens/s (layer {layer}, {args.threads} thread)")
    print(f"edits ({manifest.name})  : {len(per_edit)}, mean {report['mean_edit_s']:.1f} s/edit, "
          f"mean v* steps {report['mean_steps']:.1f}")
    print("  edit  total  prefixes    k*     v*  insert  steps")
    for i, e in enumerate(per_edit):
        print(f"  {i:4d} {e['total_s']:6.1f} {e['prefixes']:9.2f} {e['key']:6.2f} {e['value']:6.1f} "
              f"{e['insert']:7.2f} {e['steps']:6d}")
    print(f"delta                 : {size:.0f} bytes for a one-edit delta file "
          f"(budget (d_in + d_out)·4 + 4 KiB = {report['delta_budget_per_edit']})")
    for name, v in report.get("variants", {}).items():
        print(f"variant {name:14s}: mean {v['mean_edit_s']:.2f} s/edit, insert {v['mean_insert_s']:.2f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
