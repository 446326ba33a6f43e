"""Can a threshold raised at composition time cut a gated stack's leaks into generic text, and what does it cost
the paraphrases? A diagnostic before building it (docs/scale.md, "Gated edits at scale").

For every gated delta of a `romeflow bench stack` run folder it recovers the gate (a, e, τ₀, τ₁, β) from the
stored units, then, for threshold policies applied to each edit alone:

- the generic-text leak: (edit, token) pairs with g ≠ 0, and Σ g, on ``--text`` (the stack's perplexity text,
  never used to choose anything here, only to measure);
- what the edit keeps: g at the last subject token of its rewrite prompt and of its COUNTERFACT paraphrases
  (dev records), and g on its neighbourhood prompts (which should be 0).

Policies: ``stored`` (the thresholds the insert chose); ``shift:D`` (τ₀ and τ₁ raised by D); ``close:N`` (τ₀ raised
to the least value at which every one of N calibration tokens is exactly closed, τ₁ by as much): the calibration
tokens are the statistics corpus's tokens right after the gate's own TEXT_TOKENS negatives, so neither the
insert nor the perplexity text saw them.

    python bench/gate_threshold.py reports/bench/stack-dev300-gated --n 300 --policy stored shift:0.1 close:16384
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gate_leak import rows_of  # noqa: E402
from romeflow.engine import gated  # noqa: E402
from romeflow.engine.gated import Gate, _mlp_parts, gate_values, mlp_inputs  # noqa: E402
from romeflow.engine.models import load_model  # noqa: E402
from romeflow.engine.prompts import fill, subject_last_index  # noqa: E402
from romeflow.engine.statistics import token_rows, wikipedia_corpus  # noqa: E402
from romeflow.evaluation.datasets import load_counterfact  # noqa: E402
from romeflow.pipeline.deltas import load_delta  # noqa: E402
from romeflow.pipeline.compose import stored_gate  # noqa: E402


def with_thresholds(g: Gate, low: float, high: float) -> Gate:
    return Gate(g.a, g.e, low, high, g.beta, g.gated)


def subject_inputs(lm, layer: int, prompts: list[str], subject: str) -> torch.Tensor:
    """x at the last subject token of each full prompt that contains the subject: (n, d_model)."""
    texts, where = [], []
    for p in prompts:
        i = p.rfind(subject)
        if i < 0:
            continue
        texts.append(p)
        where.append(subject_last_index(lm.tokenizer, p[:i] + "{}" + p[i + len(subject):], subject))
    return mlp_inputs(lm, layer, texts, where) if texts else torch.zeros(0, lm.model.config.hidden_size)


def closing_low(g: Gate, x: torch.Tensor, m: int) -> float:
    """The least τ₀ at which all but m of the inputs x (n, d_model) are exactly closed (c > 0 only)."""
    s, c = g.score(x), g.c(x)
    need = ((s + gated.SOFT) / c)[c > 0]
    return float(need.topk(m + 1).values[-1]) if len(need) > m else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--policy", nargs="+", default=["stored", "close:16384"])
    ap.add_argument("--text", type=Path, default=ROOT / "data" / "heldout.txt")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    run = json.loads((args.folder / "run.json").read_text())
    records = load_counterfact(ROOT / run["dataset"]["path"])[:args.n]
    lm = load_model(run["model"]["name"])
    edits = []  # (record, Gate)
    for rec in records:
        path = args.folder / "deltas" / f"{rec.case_id}.safetensors"
        if not path.is_file():
            continue
        delta = load_delta(path)
        for up, m in zip(delta.updates, delta.meta["edits"]):
            edits.append((rec, stored_gate(up, m["gate"]), up))
    layer = edits[0][2].layer
    act = _mlp_parts(lm.model, layer)[3]
    # the gate's recovery is exact up to rounding: its units reproduce the stored ones
    g0, up0 = edits[0][1], edits[0][2]
    rebuilt = g0.update(up0.module, layer, up0.down[:, 0] * g0.beta * (g0.high - g0.low))
    print(f"recovered gate: max |Δ| of the unit rows {float((rebuilt.gate - up0.gate).abs().max()):.2e}")
    biggest = max([int(p.split(":")[1 if p.startswith("close:") else 2]) for p in args.policy
                   if p.startswith(("close:", "rate:"))] + [0])
    args.policy = [p + ":" if p.count(":") == (1 if p.startswith("close:") else 2) else p for p in args.policy]
    with torch.no_grad():
        x_text = gated.text_inputs(lm, layer, rows_of(lm.tokenizer, args.text.read_text(encoding="utf-8"), 256))
        x_cal = torch.zeros(0, x_text.shape[1])
        if biggest:
            rows = list(token_rows(lm, wikipedia_corpus(), gated.TEXT_TOKENS + biggest, 256))
            x_cal = gated.text_inputs(lm, layer, rows[gated.TEXT_TOKENS // 256:])  # the tokens after the gate's own
        per_edit = []
        for rec, g, _ in edits:
            per_edit.append({
                "rewrite": subject_inputs(lm, layer, [fill(rec.relation, rec.subject)], rec.subject),
                "para": subject_inputs(lm, layer, list(rec.paraphrases), rec.subject),
                "neigh": mlp_inputs(lm, layer, list(rec.neighborhood)) if rec.neighborhood else None,
            })
    print(f"{len(edits)} edits at layer {layer}; {x_text.shape[0]} text tokens; {x_cal.shape[0]} calibration tokens")
    result = {"folder": str(args.folder), "edits": len(edits), "text_tokens": x_text.shape[0], "policies": {}}
    for policy in args.policy:
        pairs, mass, rw_full, para_full, para_open, para_g, neigh_open, lows = 0, 0.0, 0, 0, 0, 0.0, 0, []
        n_para = n_neigh = 0
        capped, capped_pairs, capped_mass = [], 0, 0.0  # edits the cap stops short of closing the calibration
        open_tokens = torch.zeros(x_text.shape[0], dtype=torch.bool)
        for (rec, g, _), x in zip(edits, per_edit):
            if policy == "stored":
                gp = g
            elif policy.startswith("shift:"):
                d = float(policy.split(":")[1])
                gp = with_thresholds(g, g.low + d, g.high + d)
            elif policy.startswith(("close:", "rate:")):  # close:N[:cap], rate:M:N[:cap]
                parts = policy.split(":")
                m, n, cap = (0, *parts[1:]) if parts[0] == "close" else parts[1:]
                cap = float(cap) if cap else float("inf")
                need = closing_low(g, x_cal[:int(n)], int(m))
                if need > cap:
                    capped.append(rec.case_id)
                d = max(0.0, min(need, cap) - g.low)
                gp = with_thresholds(g, g.low + d, g.high + d)
            else:
                raise SystemExit(f"unknown policy {policy}")
            lows.append(gp.low)
            with torch.no_grad():
                gt = gate_values(gp, act, x_text)  # (N,)
                open_tokens |= gt != 0
                pairs += int((gt != 0).sum())
                mass += float(gt.abs().sum())
                if capped and capped[-1] == rec.case_id:
                    capped_pairs += int((gt != 0).sum())
                    capped_mass += float(gt.abs().sum())
                rw_full += int(float(gate_values(gp, act, x["rewrite"]).min()) > 0.99)
                gpar = gate_values(gp, act, x["para"])
                para_full += int((gpar > 0.99).sum())
                para_open += int((gpar != 0).sum())
                para_g += float(gpar.sum())
                n_para += len(gpar)
                if x["neigh"] is not None:
                    gn = gate_values(gp, act, x["neigh"])
                    neigh_open += int((gn != 0).sum())
                    n_neigh += len(gn)
        lows_t = torch.tensor(lows)
        row = {"pairs_open": pairs, "rate": pairs / (len(edits) * x_text.shape[0]), "sum_g": mass,
               "tokens_open": int(open_tokens.sum()), "rewrite_full": rw_full / len(edits),
               "para_full": para_full / n_para, "para_open": para_open / n_para, "para_mean_g": para_g / n_para,
               "neigh_last_open": neigh_open / max(n_neigh, 1), "low_median": float(lows_t.median()),
               "low_max": float(lows_t.max()), "capped": capped, "capped_pairs_open": capped_pairs,
               "capped_sum_g": capped_mass}
        result["policies"][policy] = row
        print(f"{policy:>14}: text pairs {pairs:5d} (rate {row['rate']:.2e}, Σg {mass:7.1f}, tokens {row['tokens_open']}) | "
              f"rewrite g>0.99 {100 * row['rewrite_full']:.1f}% | paraphrase g>0.99 {100 * row['para_full']:.1f}% "
              f"open {100 * row['para_open']:.1f}% mean g {row['para_mean_g']:.3f} | neighbourhood (last token) open "
              f"{100 * row['neigh_last_open']:.2f}% | τ₀ median {row['low_median']:.2f} max {row['low_max']:.2f} | "
              f"capped edits {len(capped)}: pairs {capped_pairs}, Σg {capped_mass:.1f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
