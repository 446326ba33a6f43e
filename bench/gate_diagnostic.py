"""Can a threshold on a gate score separate an edit's paraphrases from the neighbours that share its last token?

The diagnostic of issue 21, before any gated insert is built. For dev records that have token-sharing
neighbours (NS_tok), at the last subject token of each prompt and at layers 1..4, it reads the key k (the
input of the MLP's output projection) and the MLP's input x (what added neurons would see), and scores
them against the edit with several candidate gate scores:

    s_key    kᵀC⁻¹k* / k*ᵀC⁻¹k*                  the share a linear insert gives (C: the layer's key statistics)
    cos_x    cos(x, x̄*)                          x̄*: the mean MLP input over v*'s context prefixes + subject
    s_x      xᵀΣ⁻¹x̄* / x̄*ᵀΣ⁻¹x̄*                   Σ = E[x xᵀ] over generic text: linear in x
    lda_x    wᵀ(x − x̄_f) / wᵀ(x̄* − x̄_f),  w = (S + ρI)⁻¹(x̄* − x̄_f)
             the contrastive direction: positives are the context prefixes, negatives the subject's family
             (reference names sharing its last token and made-up siblings, never the benchmark's
             neighbours), S the covariance of x over generic text; 0 at the family's mean, 1 at x̄*
    lda_key  the same in key space (S = the key covariance from C)
    dot_x    xᵀx̄* / x̄*ᵀx̄*                        the plain linear analogue of cos_x
    diff_x   (x − x̄_f)ᵀ(x̄* − x̄_f) / ‖x̄* − x̄_f‖²   lda_x without whitening
    ls_x     aᵀx, a the least-squares fit without intercept of +1 on the prefixes and −1 on generic text and
             on the family: (Σ + F + P + ρI) a = p̄ − μ − f̄ (second moments and means of each group). Linear
             in x, with its decision at 0: a neuron's gate needs no bias for it
    logit_x  aᵀx, a an L2-regularised logistic regression without intercept: the prefixes and the prompt
             positive, the family and generic text (tokens the statistics used) negative, classes weighted
             equally, coordinates scaled by their sd over text. Linear, decision at 0

Every score is 1 at the edit's own prefixes' mean and is what the editor could compute from the edit alone.
Groups scored: the context prefixes (the positives the directions were built from: in-sample), the
rewrite prompt itself, the record's paraphrase (never seen by any score), its mined NS_tok neighbours
(never seen), the COUNTERFACT neighbourhood prompt (max over its tokens) and generic text (every token of
Wikipedia text after the tokens the statistics used).

AUC is paraphrases against NS_tok neighbours, pooled over records (one threshold serves every edit). The
threshold is chosen on the tuning split (Youden: max TPR − FPR) and applied unchanged to validation.

    python bench/gate_diagnostic.py --splits tuning:0:200,validation:200:200 --out reports/bench/gate-diagnostic
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from romeflow.engine.hooks import on_input, run_with_hooks, stop_after
from romeflow.engine.models import block_submodule, blocks, cache_dir, edited_module, load_model
from romeflow.engine.prompts import encode, fill, subject_last_index
from romeflow.engine import inserts
from romeflow.engine.rome import Rome, context_prefixes
from romeflow.engine.statistics import get_stats, token_rows
from romeflow.evaluation.datasets import records_with_token_neighbors
from romeflow.params import load_params

SCORES = ("s_key", "cos_x", "dot_x", "s_x", "diff_x", "lda_x", "lda_key", "ls_x", "logit_x")
GROUPS = ("prefixes", "prompt", "paraphrase", "nstok", "cf_neighbourhood")
FAMILY_MAX = 64  # family members per edit for the contrastive directions (each in the relation and bare)


@torch.no_grad()
def read_inputs(lm, layers: list[int], texts: list[str]) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{layer: (x (B, T, d_model), k (B, T, d_in), mask (B, T))}: the MLP's input and the key at every token."""
    batch = encode(lm.tokenizer, texts)
    found = forward_inputs(lm, layers, batch.input_ids, batch.attention_mask)
    return {l: (found[("x", l)], found[("k", l)], batch.attention_mask) for l in layers}


@torch.no_grad()
def forward_inputs(lm, layers: list[int], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """{("x", layer): the MLP's input (B, T, d_model), ("k", layer): the key (B, T, d_in)}, float32, from one
    forward stopped after the last of ``layers``."""
    found: dict[tuple[str, int], torch.Tensor] = {}

    def record(kind, layer):
        def hook(_m, args):
            found[(kind, layer)] = args[0].detach().float()
        return hook

    hooks = [on_input(block_submodule(lm.model, l, "mlp"), record("x", l)) for l in layers]
    hooks += [on_input(edited_module(lm.model, l), record("k", l)) for l in layers]
    with run_with_hooks(lm.model, hooks + [stop_after(blocks(lm.model)[max(layers)])]):
        lm.model(input_ids=input_ids, attention_mask=attention_mask)
    return found


def logistic_direction(pos: torch.Tensor, neg_family: torch.Tensor, neg_text: torch.Tensor, scale: torch.Tensor,
                       l2: float, steps: int = 200) -> torch.Tensor:
    """a (d,) of an L2-regularised logistic regression without intercept, P(positive | x) = σ(aᵀx): positives (p, d),
    negatives the family (f, d) and generic text (t, d), each of the three groups weighing one third. Fitted on
    coordinates divided by ``scale`` (d,), returned for raw x. float64, L-BFGS."""
    groups = [(pos / scale, 1.0), (neg_family / scale, -1.0), (neg_text / scale, -1.0)]
    w = torch.zeros(pos.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = sum(torch.nn.functional.softplus(-y * (z @ w)).mean() for z, y in groups) / 3 + l2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    return (w.detach() / scale)


def auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(score of a random positive > a random negative), ties half."""
    if not len(pos) or not len(neg):
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


def youden(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """The threshold τ (score ≥ τ fires) with the largest TPR − FPR."""
    cands = torch.cat([pos, neg]).unique()
    best, tau = -1.0, float(cands[0])
    for t in cands:
        j = float((pos >= t).float().mean() - (neg >= t).float().mean())
        if j > best:
            best, tau = j, float(t)
    return tau


def quantiles(t: torch.Tensor) -> dict:
    if not len(t):
        return {}
    q = torch.quantile(t.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return {"n": len(t), "p10": q[0], "median": q[1], "p90": q[2], "mean": float(t.mean())}


def main() -> None:  # noqa: C901 - one measurement, top to bottom
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--splits", default="tuning:0:200,validation:200:200", help="NAME:START:N,...")
    ap.add_argument("--layers", default="1,2,3,4")
    ap.add_argument("--generic-tokens", type=int, default=4096, help="held-out generic tokens scored per edit")
    ap.add_argument("--input-tokens", type=int, default=50_000, help="tokens for Σ = E[x xᵀ] (the stats' first ones)")
    ap.add_argument("--ridge", type=float, default=0.05, help="ρ of the contrastive directions, × mean eigenvalue")
    ap.add_argument("--ls-ridge", type=float, default=1e-3, help="ρ of ls_x, × mean eigenvalue")
    ap.add_argument("--logit-l2", type=float, default=1e-2, help="L2 weight of logit_x (on sd-scaled coordinates)")
    ap.add_argument("--out", default="reports/bench/gate-diagnostic")
    args = ap.parse_args()
    torch.set_num_threads(1)
    params = load_params(args.params)
    layers = [int(x) for x in args.layers.split(",")]
    lm = load_model(params.model)
    cache = cache_dir()
    corpus = params.stats.corpus_source()
    stats = get_stats(lm, layers, corpus, params.stats.tokens, cache, params.stats.seq_len)
    c = {l: stats[l].second_moment.double() for l in layers}  # (d_in, d_in) key second moments
    rome = Rome(lm, params.rome, lambda l: c[l], Path(args.params).parent)
    prefixes = context_prefixes(lm, params.rome)

    # Generic text: Σ_x from the statistics' first tokens; the scored tokens come after everything they used.
    rows = list(token_rows(lm, corpus, params.stats.tokens + args.generic_tokens, params.stats.seq_len))
    n_fit = args.input_tokens // params.stats.seq_len
    n_skip = params.stats.tokens // params.stats.seq_len
    sums = {l: 0.0 for l in layers}
    counts = 0
    for i in range(0, n_fit, 8):
        got = read_inputs_ids(lm, layers, rows[i:min(i + 8, n_fit)])
        for l in layers:
            x = got[l][0]
            sums[l] = sums[l] + x.T.double() @ x.double()
        counts += got[layers[0]][0].shape[0]
    sigma = {l: sums[l] / counts for l in layers}  # (d_model, d_model) E[x xᵀ]
    fit_rows = read_inputs_ids(lm, layers, rows[:8])  # ~2,000 generic tokens: the logistic gate's text negatives
    fit_x = {l: fit_rows[l][0].double() for l in layers}
    scale_x = {l: fit_x[l].std(0).clamp_min(1e-6) for l in layers}
    generic = read_inputs_ids(lm, layers, rows[n_skip:])
    gx = {l: generic[l][0] for l in layers}  # (G, d_model)
    gk = {l: generic[l][1] for l in layers}  # (G, d_in)
    mean_x = {l: gx[l].double().mean(0) for l in layers}
    cov_x = {l: sigma[l] - torch.outer(mean_x[l], mean_x[l]) for l in layers}
    mean_k = {l: gk[l].double().mean(0) for l in layers}
    cov_k = {l: c[l] - torch.outer(mean_k[l], mean_k[l]) for l in layers}
    print(f"generic tokens scored: {gx[layers[0]].shape[0]}; Σ_x from {counts} tokens")

    def ridge_solve(s: torch.Tensor, b: torch.Tensor, ridge: float | None = None) -> torch.Tensor:
        lam = (args.ridge if ridge is None else ridge) * s.diagonal().mean()
        return torch.linalg.solve(s + lam * torch.eye(s.shape[0], dtype=s.dtype), b)

    splits = [(name, int(a), int(b)) for name, a, b in (s.split(":") for s in args.splits.split(","))]
    records = records_with_token_neighbors(params.bench.counterfact_records, lm.tokenizer, params.bench.token_neighbors_k,
                                           params.bench.token_neighbors_facts)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"layers": layers, "records_file": params.bench.counterfact_records, "splits": {}}
    thresholds: dict[tuple[int, str], float] = {}
    for split, start, n in splits:
        chosen = records[start:start + n]
        print(f"{split}: records {start}..{start + len(chosen) - 1} of {len(records)} with token neighbours")
        scores = {(l, s, g): [] for l in layers for s in SCORES for g in GROUPS}
        gen_top = {(l, s): [] for l in layers for s in SCORES}  # per edit: the generic scores (top 64)
        gen_q = {(l, s): [] for l in layers for s in SCORES}  # per edit: 99.9th percentile
        for ri, rec in enumerate(chosen):
            subj = rec.subject
            neighbours = {t.subject for t in rec.token_neighbors}
            fam = [f for f in inserts.family(rome, subj) if f not in neighbours and f != subj]
            fam = random.Random(f"fam:{rec.case_id}").sample(fam, min(FAMILY_MAX, len(fam)))
            paras = [p for p in rec.paraphrases if subj in p]
            texts, where, group = [], [], []

            def add(text_template: str, s: str, g: str) -> None:
                texts.append(fill(text_template, s))
                where.append(subject_last_index(lm.tokenizer, text_template, s))
                group.append(g)

            for p in prefixes:
                add(p + "{}", subj, "prefixes")
            add(rec.relation, subj, "prompt")
            for p in paras:
                add(p.replace(subj, "{}", 1), subj, "paraphrase")
            for t in rec.token_neighbors:
                add(rec.relation, t.subject, "nstok")
            for f in fam:
                add(rec.relation, f, "family")
                add("{}", f, "family")
            n_pos = len(texts)
            texts += list(rec.neighborhood)
            got = read_inputs(lm, layers, texts)
            for l in layers:
                x_all, k_all, mask = got[l]
                idx = torch.tensor(where)
                x = x_all[torch.arange(n_pos), idx].double()  # (n, d_model)
                k = k_all[torch.arange(n_pos), idx].double()  # (n, d_in)
                g = group
                pre = torch.tensor([gi == "prefixes" for gi in g])
                famm = torch.tensor([gi == "family" for gi in g])
                x_star, k_star = x[pre].mean(0), k[pre].mean(0)
                funcs = {}
                ck = torch.linalg.solve(c[l], k_star)  # C⁻¹k*
                funcs["s_key"] = ("k", lambda v, ck=ck, ks=k_star: v @ ck / (ks @ ck))
                funcs["cos_x"] = ("x", lambda v, xs=x_star: (v @ xs) / (v.norm(dim=-1) * xs.norm()))
                sx = ridge_solve(sigma[l], x_star, 1e-6)  # (Σ has null directions: coordinates the norm's weight zeroes)
                funcs["s_x"] = ("x", lambda v, sx=sx, xs=x_star: v @ sx / (xs @ sx))
                if famm.any():
                    xf, kf = x[famm].mean(0), k[famm].mean(0)
                    w = ridge_solve(cov_x[l], x_star - xf)
                    funcs["lda_x"] = ("x", lambda v, w=w, xf=xf, xs=x_star: (v - xf) @ w / ((xs - xf) @ w))
                    wk = ridge_solve(cov_k[l], k_star - kf)
                    funcs["lda_key"] = ("k", lambda v, w=wk, kf=kf, ks=k_star: (v - kf) @ w / ((ks - kf) @ w))
                funcs["dot_x"] = ("x", lambda v, xs=x_star: v @ xs / (xs @ xs))
                if famm.any():
                    d = x_star - xf
                    funcs["diff_x"] = ("x", lambda v, d=d, xf=xf: (v - xf) @ d / (d @ d))
                    xp, xfm = x[pre], x[famm]
                    lhs = sigma[l] + xfm.T @ xfm / len(xfm) + xp.T @ xp / len(xp)
                    a = ridge_solve(lhs, xp.mean(0) - mean_x[l] - xfm.mean(0), args.ls_ridge)
                    funcs["ls_x"] = ("x", lambda v, a=a: v @ a)
                if famm.any():
                    pos = torch.cat([x[pre], x[torch.tensor([gi == "prompt" for gi in g])]])
                    a = logistic_direction(pos, x[famm], fit_x[l], scale_x[l], args.logit_l2)
                    funcs["logit_x"] = ("x", lambda v, a=a: v @ a)
                for name, (space, fn) in funcs.items():
                    vals = fn(x if space == "x" else k)
                    for gname in ("prefixes", "prompt", "paraphrase", "nstok"):
                        sel = torch.tensor([gi == gname for gi in g])
                        scores[(l, name, gname)] += vals[sel].float().tolist()
                    if rec.neighborhood:  # every token but the first (<bos> or the first word)
                        xs_n, ks_n, m_n = x_all[n_pos:], k_all[n_pos:], mask[n_pos:]
                        for j in range(xs_n.shape[0]):
                            tokens = (xs_n[j] if space == "x" else ks_n[j])[1:int(m_n[j].sum())].double()
                            if len(tokens):
                                scores[(l, name, "cf_neighbourhood")].append(float(fn(tokens).max()))
                    gvals = fn((gx[l] if space == "x" else gk[l]).double()).float()
                    gen_top[(l, name)].append(gvals.topk(64).values.tolist())
                    gen_q[(l, name)].append(float(torch.quantile(gvals, 0.999)))
            if (ri + 1) % 25 == 0:
                print(f"  {ri + 1}/{len(chosen)}", flush=True)
        table = {}
        for l in layers:
            for name in SCORES:
                t = {g: torch.tensor(scores[(l, name, g)]) for g in GROUPS}
                if not len(t["paraphrase"]):
                    continue
                key = (l, name)
                if key not in thresholds:  # chosen on the first split (tuning), kept for the others
                    thresholds[key] = youden(t["paraphrase"], t["nstok"])
                tau = thresholds[key]
                top = torch.tensor(gen_top[key])  # (edits, 64)
                table[f"L{l}/{name}"] = {
                    "layer": l, "score": name, "auc_paraphrase_vs_nstok": auc(t["paraphrase"], t["nstok"]),
                    "auc_prompt_vs_nstok": auc(t["prompt"], t["nstok"]),
                    "auc_paraphrase_vs_cf_neighbourhood": auc(t["paraphrase"], t["cf_neighbourhood"]),
                    "threshold": tau,
                    "tpr_paraphrase": float((t["paraphrase"] >= tau).float().mean()),
                    "tpr_prompt": float((t["prompt"] >= tau).float().mean()),
                    "tpr_prefixes": float((t["prefixes"] >= tau).float().mean()),
                    "fpr_nstok": float((t["nstok"] >= tau).float().mean()),
                    "at_zero": {g: float((t[g] > 0).float().mean()) for g in GROUPS if len(t[g])}
                    if name in ("ls_x", "logit_x") else None,
                    "fpr_cf_neighbourhood": float((t["cf_neighbourhood"] >= tau).float().mean())
                    if len(t["cf_neighbourhood"]) else None,
                    "generic_fire_rate": float((top >= tau).float().sum() / (top.shape[0] * gx[l].shape[0])),
                    "generic_edits_firing": float((top[:, 0] >= tau).float().mean()),
                    "generic_p999_median": float(torch.tensor(gen_q[key]).median()),
                    **{g: quantiles(t[g]) for g in GROUPS},
                }
        result["splits"][split] = {"start": start, "records": len(chosen), "table": table}
        print_table(split, table)
    (out_dir / "report.json").write_text(json.dumps(result, indent=1))
    (out_dir / "report.md").write_text(markdown(result))
    print(f"wrote {out_dir / 'report.json'} and report.md")


@torch.no_grad()
def read_inputs_ids(lm, layers: list[int], rows: list[list[int]]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Like read_inputs for token rows of equal length; returns {layer: (x (N, d_model), k (N, d_in))} of every
    token but each row's first (<bos>)."""
    out = {l: ([], []) for l in layers}
    for i in range(0, len(rows), 8):
        ids = torch.tensor(rows[i:i + 8])  # (≤ 8, T)
        found = forward_inputs(lm, layers, ids, torch.ones_like(ids))
        for l in layers:
            out[l][0].append(found[("x", l)][:, 1:].reshape(-1, found[("x", l)].shape[-1]))
            out[l][1].append(found[("k", l)][:, 1:].reshape(-1, found[("k", l)].shape[-1]))
    return {l: (torch.cat(out[l][0]), torch.cat(out[l][1])) for l in layers}


def print_table(split: str, table: dict) -> None:
    print(f"\n{split}")
    print(f"{'layer/score':16} {'AUC':>6} {'τ':>7} {'para≥τ':>7} {'prompt≥τ':>8} {'nstok≥τ':>8} {'cfN≥τ':>6} "
          f"{'text':>8}  para med(p10)  nstok med(p90)")
    for k, r in table.items():
        p, nb = r["paraphrase"], r["nstok"]
        print(f"{k:16} {r['auc_paraphrase_vs_nstok']:6.3f} {r['threshold']:7.3f} {r['tpr_paraphrase']:7.2f} "
              f"{r['tpr_prompt']:8.2f} {r['fpr_nstok']:8.2f} {r['fpr_cf_neighbourhood'] or 0:6.2f} "
              f"{r['generic_fire_rate']:8.1e}  {p['median']:.2f} ({p['p10']:.2f})  {nb['median']:.2f} ({nb['p90']:.2f})")


def markdown(result: dict) -> str:
    lines = ["# Gate diagnostic (issue 21)", "",
             f"Records: `{result['records_file']}` with token-sharing neighbours. The threshold τ of each score is "
             "chosen on the first split (Youden on paraphrases vs NS_tok neighbours) and applied unchanged to the "
             "others. Scores are 1 at the mean of the edit's own context prefixes.", ""]
    for split, s in result["splits"].items():
        lines += [f"## {split} (records {s['start']}..{s['start'] + s['records'] - 1})", "",
                  "| layer | score | AUC para vs NS_tok | τ | para ≥ τ | prompt ≥ τ | NS_tok ≥ τ | CF neighbourhood ≥ τ "
                  "| generic tokens ≥ τ | paraphrase median (p10) | NS_tok median (p90) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in s["table"].values():
            p, nb = r["paraphrase"], r["nstok"]
            cf = r["fpr_cf_neighbourhood"]
            lines.append(f"| {r['layer']} | {r['score']} | {r['auc_paraphrase_vs_nstok']:.3f} | {r['threshold']:.3f} | "
                         f"{r['tpr_paraphrase']:.2f} | {r['tpr_prompt']:.2f} | {r['fpr_nstok']:.2f} | "
                         f"{'–' if cf is None else f'{cf:.2f}'} | {r['generic_fire_rate']:.1e} | "
                         f"{p['median']:.2f} ({p['p10']:.2f}) | {nb['median']:.2f} ({nb['p90']:.2f}) |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
