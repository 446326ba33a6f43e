"""Probe: can δ be chosen so that an entity-specific insert direction does little damage?

The insert's direction v (Δ = δ vᵀ) does not depend on v*. Holding the family's mean key fixed (one
more constraint, the family centroid) takes the family's share of δ to ~0, but costs the update ~14×
the rank-one insert's energy on generic text. This probe re-optimises δ for that direction with the
update applied at EVERY position (a hook adding (vᵀk_t) δ to the module's output, which is exactly
what Ŵ does), and a KL term on generic text (Wikipedia windows, not the held-out damage text):

    L(δ) = mean_j NLL(o* | x_j + p; Ŵ)  +  kl_factor · KL(essence)  +  wd · (‖δ‖/‖W k*‖)²
           + λ · mean_t KL(P_Ŵ[· | text_<t] ‖ P[· | text_<t])

and reports, per variant, ES, PS, NS, NS_tok and PPL+ (the bench's held-out perplexity).

    python bench/text_kl_probe.py --n 10 --lambdas 0,3,10
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

from romeflow.bench import counterfact_record_values, score_counterfact
from romeflow.datasets import records_with_token_neighbors
from romeflow.evaluation import text_predictions
from romeflow.models import cache_dir, edited_module, edited_module_name, load_model, logits_at, final_hidden
from romeflow.params import load_params
from romeflow.prompts import fill, mean_per_pair, pad, teacher_forced
from romeflow.rome import EditRequest, Rome, add_rank_one, insert_many, subject_keys
from romeflow.statistics import corpus_from, get_stats, token_rows


def update_hook(v: torch.Tensor, delta: torch.Tensor):
    """Ŵ = W + δ vᵀ as a hook: output + (input · v) δ at every position."""
    def hook(_module, inputs, output):
        return output + (inputs[0].float() @ v)[..., None] * delta
    return hook


def optimise(lm, layer, request, prefixes, v, k_star, p, text_ids, lam, steps=25):
    tok, model = lm.tokenizer, lm.model
    module = edited_module(model, layer)
    prompts = [fill(x + request.relation, request.subject) for x in prefixes]
    tb = teacher_forced(tok, prompts, [request.target] * len(prompts))
    ess = tok(fill(p.essence_prompt, request.subject), return_tensors="pt")
    text_mask = torch.ones_like(text_ids)
    with torch.no_grad():
        w_k = module(k_star[None])[0]
        base_text = logits_at(model, final_hidden(model, text_ids, text_mask)).log_softmax(-1)
        base_ess = logits_at(model, final_hidden(model, ess.input_ids, ess.attention_mask)[:, -1]).log_softmax(-1)[0]
    delta = torch.zeros_like(w_k, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=p.lr)
    max_norm = p.clamp_norm_factor * w_k.norm()
    for step in range(steps + 1):
        h = module.register_forward_hook(update_hook(v, delta))
        try:
            hidden = final_hidden(model, tb.batch.input_ids, tb.batch.attention_mask)
            lp = logits_at(model, hidden[tb.rows, tb.positions]).log_softmax(-1)
            nll = -mean_per_pair(lp.gather(1, tb.token_ids[:, None])[:, 0], tb).mean()
            if nll.item() < p.early_stop_nll or step == steps:
                break
            e = logits_at(model, final_hidden(model, ess.input_ids, ess.attention_mask)[:, -1]).log_softmax(-1)[0]
            loss = nll + p.kl_factor * (e.exp() * (e - base_ess)).sum() \
                + p.weight_decay * (delta.norm() / w_k.norm()) ** 2
            if lam > 0:
                t = logits_at(model, final_hidden(model, text_ids, text_mask)).log_softmax(-1)
                loss = loss + lam * (t.exp() * (t - base_text)).sum(-1).mean()
        finally:
            h.remove()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    return delta.detach(), step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--lambdas", default="0,3,10")
    ap.add_argument("--text-tokens", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    p = load_params(args.params)
    root = Path(args.params).resolve().parent
    lm = load_model(p.model)
    layer = p.rome.layer
    facts = root / p.bench.token_neighbors_facts if p.bench.token_neighbors_facts else None
    records = records_with_token_neighbors(root / p.bench.counterfact_records, lm.tokenizer,
                                           p.bench.token_neighbors_k, facts)[args.start:args.start + args.n]
    stats = get_stats(lm, [layer], p.stats.corpus_source(), p.stats.tokens, cache_dir(None), p.stats.seq_len)
    rome = Rome(lm, p.rome, lambda _: stats[layer].second_moment, root)
    name = edited_module_name(lm.model, layer)
    heldout = (root / (p.bench.damage_text or p.stack.heldout)).read_text()
    window, tokens = 256, p.bench.damage_tokens
    # generic text for the KL term: Wikipedia windows far past the statistics' first tokens
    rows = list(token_rows(lm, p.stats.corpus_source(), 64 * 40, 64))[-(args.text_tokens // 64):]
    text_ids = pad(rows, lm.tokenizer.pad_token_id).input_ids
    base_nll = float(text_predictions(lm, heldout, window, tokens)[0].mean())
    variants = ["default", "centroid"] + [f"centroid+kl{lam}" for lam in args.lambdas.split(",")]
    out = {v: [] for v in variants}
    for i, rec in enumerate(records):
        req = rec.request
        res = rome.compute(req)
        k_all = subject_keys(lm, layer, [x + "{}" for x in rome.prefixes], req.subject)
        k_p = subject_keys(lm, layer, [req.relation], req.subject)
        names = [n for n in rome.family(req.subject) if n != req.subject]
        centroid = rome.bare_keys(layer, names).mean(0, keepdim=True) if names else None
        keys = torch.cat([k_all, k_p])
        _, vv = insert_many(rome.solver(layer), keys, torch.ones(keys.shape[0], 1), None, centroid, 1e-6, 0.0)
        v_c = vv.sum(1)  # (d_in,), vᵀk = 1 on the context keys, 0 on the centroid
        w_k = rome.module_out(layer, res.k_star)
        delta0 = res.v_star - w_k
        for var in variants:
            if var == "default":
                u, v = res.update.u, res.update.v
            elif var == "centroid":
                u, v = delta0, v_c
            else:
                lam = float(var.split("kl")[1])
                u, _ = optimise(lm, layer, req, rome.prefixes, v_c, res.k_star, p.rome, text_ids, lam)
                v = v_c
            w0 = lm.model.get_submodule(name).weight.detach().clone()
            add_rank_one(lm.model, name, u, v)
            row = {"scores": score_counterfact(lm, rec, None, 0)["scores"]}
            m = counterfact_record_values(row)
            m["ppl"] = 100 * math.expm1(float(text_predictions(lm, heldout, window, tokens)[0].mean()) - base_nll)
            with torch.no_grad():
                lm.model.get_submodule(name).weight.copy_(w0)
            out[var].append(m)
        print(i + 1, {v: {k: round(x, 2) for k, x in out[v][-1].items() if isinstance(x, float) and not math.isnan(x)}
                      for v in variants}, flush=True)
    print("| variant | ES | PS | NS | NS_tok | PPL+ mean | median |\n|---|---|---|---|---|---|---|")
    for var in variants:
        ms = out[var]
        mean = lambda k: statistics.mean([m[k] for m in ms if k in m and not math.isnan(m[k])])  # noqa: E731
        print(f"| {var} | {mean('ES'):.1f} | {mean('PS'):.1f} | {mean('NS'):.1f} | {mean('NS_tok'):.1f} | "
              f"{mean('ppl'):.2f} | {statistics.median([m['ppl'] for m in ms]):.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
