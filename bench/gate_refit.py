"""Can a gate refitted against hard negatives close what the capped threshold leaves open? A diagnostic before
building it (docs/scale.md, "1,000 edits").

Under ``stack.gate_text`` each gate's τ₀ is raised until N calibration tokens are exactly closed, at most
gated.MAX_LOW. Edits whose gate needs more than the cap score some generic tokens above their own prompt: no
threshold closes them. This script refits those gates' direction a with the calibration tokens they leave open
as one more group of negatives (``gated.logistic_direction``; the same positives, family, protected subjects,
prompt tokens and text as ``gated.fit_gate``), normalises s(x*) = 1, then raises the refitted gate as the stack
does. δ is kept. Then, against the shipped composition of the same deltas:

- the leak on ``--text`` (the stack's perplexity text, measured, never used to choose): (edit, token) pairs
  with g ≠ 0 and Σ g;
- the refitted edits' g on their rewrite prompt and their dev paraphrases (last subject token);
- with ``--compose``: the perplexity of ``--text`` with all the run's deltas composed, shipped against refitted
  (the bench's ``_perplexity``), and ES/PS of the refitted edits' records in that composed model.

    python bench/gate_refit.py reports/bench/stack-dev1000-gated --n 1000 --compose --out FILE

Kept as the diagnostic that was run (reports/bench/stack-dev1000-gated/gate-refit.json). The lever it led to is
``compose.refit_gate`` (stack.gate_refit), which also closes the family as the insert does and keeps a refit only
when it leaves fewer calibration tokens open; measure that one with `romeflow bench stack --variant`.
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
from bench.gate_threshold import subject_inputs  # noqa: E402
from romeflow.engine import gated  # noqa: E402
from romeflow.engine.gated import (Gate, _mlp_parts, closing_low, constant_direction, family_inputs,  # noqa: E402
                                   gate_values, held_inputs, logistic_direction, prompt_inputs, slope)
from romeflow.engine.models import load_model  # noqa: E402
from romeflow.engine.prompts import fill, subject_last_index  # noqa: E402
from romeflow.engine.rome import Rome  # noqa: E402
from romeflow.evaluation.datasets import load_counterfact  # noqa: E402
from romeflow.evaluation.stackbench import _perplexity, record_manifest  # noqa: E402
from romeflow.params import load_params  # noqa: E402
from romeflow.pipeline.compose import (EditedModel, calibration_inputs, raise_gate, rethreshold,  # noqa: E402
                                       stored_gate)
from romeflow.pipeline.deltas import Delta, load_delta  # noqa: E402


def refit(rome: Rome, request, layer: int, hard: torch.Tensor, old: Gate, l2: float) -> Gate:
    """fit_gate's direction with ``hard`` (m, d_model) as one more group of negatives; s(x*) = 1, c(x*) = 1,
    the stored gate's τ₀ and τ₁ (raised afterwards as the stack raises every gate)."""
    tok = rome.lm.tokenizer
    templates = [p + "{}" for p in rome.prefixes] + [request.relation]
    pos, rest = prompt_inputs(rome.lm, layer, [fill(t, request.subject) for t in templates],
                              [subject_last_index(tok, t, request.subject) for t in templates])
    text = rome.text_inputs(layer)
    negatives = [family_inputs(rome, request, layer), rest, held_inputs(rome, request, layer), hard]
    a = logistic_direction(pos, negatives, text, l2)
    x_star = pos[-1].double()
    if not float(x_star @ a) > 0:
        return old
    a = a / (x_star @ a)
    e = constant_direction(text) if old.gated else torch.zeros_like(a)
    if old.gated:
        e = e / (x_star @ e)
    return Gate(a.float(), e.float(), old.low, old.high, slope(rome.lm.model, layer, old.high), old.gated)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=32768, help="calibration tokens (stack.gate_text)")
    ap.add_argument("--text", type=Path, default=ROOT / "data" / "heldout.txt")
    ap.add_argument("--compose", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    run = json.loads((args.folder / "run.json").read_text())
    records = load_counterfact(ROOT / run["dataset"]["path"])[:args.n]
    settings = load_params(ROOT / "params.yaml")
    lm = load_model(run["model"]["name"])
    corpus = settings.stats.corpus_source()
    rome = Rome(lm, settings.rome, lambda layer: None, ROOT, corpus=corpus)
    deltas: list[Delta] = []
    recs = []
    for rec in records:
        path = args.folder / "deltas" / f"{rec.case_id}.safetensors"
        if path.is_file():
            deltas.append(load_delta(path))
            recs.append(rec)
    layer = deltas[0].updates[0].layer
    act = _mlp_parts(lm.model, layer)[3]
    with torch.no_grad():
        x_cal = calibration_inputs(lm, layer, corpus, args.tokens)  # (N, d_model)
        x_text = gated.text_inputs(lm, layer, rows_of(lm.tokenizer, args.text.read_text(encoding="utf-8"), 256))
    shipped, refitted, changed = [], [], []
    rows = {"shipped": [0, 0.0], "refit": [0, 0.0]}
    keep = {"rewrite": [0, 0], "para_full": [0, 0], "para_g": [0.0, 0.0], "n_para": 0, "still_capped": 0}
    for j, (rec, d) in enumerate(zip(recs, deltas)):
        up = d.updates[0]
        g0 = stored_gate(up, d.meta["edits"][0]["gate"])
        g1 = raise_gate(lm.model, g0, layer, x_cal)
        new_up = d.updates[0] if g1 is g0 else rethreshold(up, g0, g1)
        shipped.append(Delta([new_up], d.meta, d.path, d.pairs))
        g2 = g1
        if closing_low(g0.a, g0.e, g0.gated, x_cal) > gated.MAX_LOW:  # capped: some calibration tokens stay open
            open_ = gate_values(g1, act, x_cal) != 0
            request = record_manifest(rec, run["dataset"]["path"]).edits[0].request
            fit = refit(rome, request, layer, x_cal[open_], g0, rome.spec.gate_l2)
            g2 = raise_gate(lm.model, fit, layer, x_cal)
            keep["still_capped"] += closing_low(fit.a, fit.e, fit.gated, x_cal) > gated.MAX_LOW
            changed.append(j)
            with torch.no_grad():
                x_rw = subject_inputs(lm, layer, [fill(rec.relation, rec.subject)], rec.subject)
                x_pa = subject_inputs(lm, layer, list(rec.paraphrases), rec.subject)
                for i, g in enumerate((g1, g2)):
                    keep["rewrite"][i] += int(float(gate_values(g, act, x_rw).min()) > 0.99)
                    gp = gate_values(g, act, x_pa)
                    keep["para_full"][i] += int((gp > 0.99).sum())
                    keep["para_g"][i] += float(gp.sum())
                keep["n_para"] += len(x_pa)
            delta_vec = up.down[:, 0] * g0.beta * (g0.high - g0.low)
            refitted.append(Delta([g2.update(up.module, layer, delta_vec)], d.meta, d.path, d.pairs))
        else:
            refitted.append(shipped[-1])
        with torch.no_grad():
            for name, g in (("shipped", g1), ("refit", g2)):
                gt = gate_values(g, act, x_text)
                rows[name][0] += int((gt != 0).sum())
                rows[name][1] += float(gt.abs().sum())
        if j % 100 == 0:
            print(f"{j}/{len(recs)}: refitted {len(changed)}", flush=True)
    m = max(len(changed), 1)
    result = {"edits": len(recs), "refitted": len(changed), "still_capped": int(keep["still_capped"]),
              "text_tokens": int(x_text.shape[0]),
              "pairs_open": {k: v[0] for k, v in rows.items()}, "sum_g": {k: v[1] for k, v in rows.items()},
              "refitted_rewrite_full": [keep["rewrite"][i] / m for i in (0, 1)],
              "refitted_para_full": [keep["para_full"][i] / max(keep["n_para"], 1) for i in (0, 1)],
              "refitted_para_mean_g": [keep["para_g"][i] / max(keep["n_para"], 1) for i in (0, 1)]}
    print(json.dumps(result))
    if args.compose:
        from romeflow.evaluation.bench import counterfact_record_values, score_counterfact

        edited = EditedModel(lm)
        for name, ds in (("shipped", shipped), ("refit", refitted)):
            edited.compose(ds, None)  # gated deltas with their thresholds already set: appended as they are
            ppl = _perplexity(lm, args.text.read_text(encoding="utf-8"), 256)
            vals = [counterfact_record_values(score_counterfact(lm, recs[j], None, recs[j].case_id)) for j in changed]
            result[name] = {"perplexity": ppl,
                            "ES_refitted": sum(v["ES"] for v in vals) / m,
                            "PS_refitted": sum(v["PS"] for v in vals) / m}
            edited.reset()
            print(name, json.dumps(result[name]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
