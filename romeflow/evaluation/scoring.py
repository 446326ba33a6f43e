"""Scoring prompts: target probabilities by mean per-token NLL, and next-token rankings.

One forward pass scores a whole batch of (prompt, target) pairs; only the positions that predict a
target token go through the output head.
"""

from __future__ import annotations

import math

import torch

from ..engine.models import LoadedModel, cache_kwargs, final_hidden, logits_at, new_cache
from ..engine.prompts import continuation, encode, fill, flush_denormals, mean_per_pair, teacher_forced
from .bystanders import Bystanders, TokenSharing, mentions_held
from .datasets import CounterfactRecord, load_counterfact  # noqa: F401  (re-exported)
from ..pipeline.manifests import subject_of
from .metrics import harmonic_mean, magnitude, success, wilson_ci


@torch.no_grad()
def target_scores(lm: LoadedModel, prompts: list[str], targets: list[str],
                  batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (prompt, target) pair: mean per-token NLL (n,) and the share of target tokens that are the
    argmax prediction, teacher-forced (n,) — one forward pass per batch, the head only at target positions."""
    nll, acc = [], []
    with flush_denormals():
        for i in range(0, len(prompts), batch_size):
            tb = teacher_forced(lm.tokenizer, prompts[i:i + batch_size], targets[i:i + batch_size])
            hidden = final_hidden(lm.model, tb.batch.input_ids, tb.batch.attention_mask)  # (B, T, d)
            logits = logits_at(lm.model, hidden[tb.rows, tb.positions])  # (n_tokens, vocab)
            token_ids = tb.token_ids.to(logits.device)
            logp = logits.log_softmax(-1).gather(1, token_ids[:, None])[:, 0]  # (n_tokens,)
            hit = (logits.argmax(-1) == token_ids).float()  # (n_tokens,)
            nll.append(-mean_per_pair(logp, tb).cpu())
            acc.append(mean_per_pair(hit, tb).cpu())
    if not nll:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(nll), torch.cat(acc)


def target_nll(lm: LoadedModel, prompts: list[str], targets: list[str], batch_size: int = 32) -> torch.Tensor:
    """Mean per-token negative log-likelihood of each target after its prompt: (n,)."""
    return target_scores(lm, prompts, targets, batch_size)[0]


@torch.no_grad()
def next_token_top(lm: LoadedModel, prompts: list[str], k: int = 5) -> list[list[tuple[str, float]]]:
    """The k most likely next tokens (decoded) and their probabilities, for each prompt."""
    with flush_denormals():
        b = encode(lm.tokenizer, prompts)
        hidden = final_hidden(lm.model, b.input_ids, b.attention_mask)  # (B, T, d)
        probs = logits_at(lm.model, hidden[torch.arange(len(prompts)), b.lengths - 1]).softmax(-1)  # (B, V)
        top = probs.topk(k, dim=-1)
        top = type(top)((top.values.cpu(), top.indices.cpu()))
    return [[(lm.tokenizer.decode(int(i)), float(p)) for p, i in zip(vals, idx)]
            for vals, idx in zip(top.values, top.indices)]


@torch.no_grad()
def greedy_continuation(lm: LoadedModel, prompt: str, max_new_tokens: int = 20) -> str:
    """Greedy decoding, one full forward pass per token (short outputs; deterministic)."""
    ids = lm.tokenizer(prompt).input_ids
    n_prompt = len(ids)
    with flush_denormals():
        for _ in range(max_new_tokens):
            x = torch.tensor([ids])
            nxt = int(logits_at(lm.model, final_hidden(lm.model, x, torch.ones_like(x))[0, -1]).argmax())
            if nxt == lm.tokenizer.eos_token_id:
                break
            ids.append(nxt)
    return lm.tokenizer.decode(ids[n_prompt:], skip_special_tokens=True)


def edit_probabilities(lm: LoadedModel, prompt: str, target: str, target_true: str | None) -> dict:
    """P[target] and P[target_true] (when known) on one prompt."""
    targets = [target] + ([target_true] if target_true else [])
    nll = target_nll(lm, [prompt] * len(targets), targets)
    out = {"p_target": math.exp(-nll[0].item())}
    if target_true:
        out["p_true"] = math.exp(-nll[1].item())
    return out


# --------------------------------------------------------------------------------------------------
# COUNTERFACT records and their scores (ES/PS/NS and magnitudes)
# --------------------------------------------------------------------------------------------------


def score_record(lm: LoadedModel, rec: CounterfactRecord) -> dict[str, list[tuple[float, float]]]:
    """(NLL of target_new, NLL of target_true) for each rewrite, paraphrase and neighbourhood prompt."""
    groups = {"rewrite": [fill(rec.relation, rec.subject)], "paraphrase": list(rec.paraphrases),
              "neighborhood": list(rec.neighborhood)}
    prompts = [p for ps in groups.values() for p in ps]
    nll = target_nll(lm, prompts * 2, [rec.target_new] * len(prompts) + [rec.target_true] * len(prompts)).tolist()
    pairs = list(zip(nll[: len(prompts)], nll[len(prompts):]))
    out, i = {}, 0
    for name, ps in groups.items():
        out[name] = pairs[i: i + len(ps)]
        i += len(ps)
    return out


def record_metrics(scores: dict[str, list[tuple[float, float]]]) -> dict[str, float]:
    """Per-record success rates and magnitudes (%, means over the record's prompts): the same functions
    as the benchmark's (metrics.success / metrics.magnitude).

    ES/PS: P[new] > P[true]; NS: P[true] > P[new]; EM/PM/NM: the matching probability differences.
    """
    out = {}
    for short, group, new_wins in (("E", "rewrite", True), ("P", "paraphrase", True), ("N", "neighborhood", False)):
        if scores.get(group):
            out[short + "S"] = success(scores[group], new_wins)
            out[short + "M"] = magnitude(scores[group], new_wins)
    return out


# --------------------------------------------------------------------------------------------------
# A manifest's own edits: scores before and after its delta
# --------------------------------------------------------------------------------------------------


def _first_token(lm: LoadedModel, target: str) -> int:
    return lm.tokenizer(continuation(target), add_special_tokens=False).input_ids[0]


def _top1(lm: LoadedModel, prompts: list[str]) -> list[int]:
    with torch.no_grad(), flush_denormals():
        b = encode(lm.tokenizer, prompts)
        hidden = final_hidden(lm.model, b.input_ids, b.attention_mask)
        return logits_at(lm.model, hidden[torch.arange(len(prompts)), b.lengths - 1]).argmax(-1).tolist()


def score_manifest(lm: LoadedModel, manifest, old_objects: list[str] | None = None,
                   base_top1: list[list[int]] | None = None, others: Bystanders | None = None) -> dict:
    """Scores of every edit of a manifest on the model as it is now.

    Each edit compares its target o* with its old object o_c: ``target_true`` when the manifest
    gives it, else ``old_objects[i]`` (the unedited model's own top-1 answer). A neighbour with an
    answer succeeds when P[answer] > P[o*]; one without succeeds when its top-1 token is still the
    unedited model's (``base_top1``; on the unedited model itself, trivially). ``others``: per edit,
    the subjects held by construction (neighbours that mention one are marked ``held`` and not scored;
    default: the ``protect:`` lists) and the mined token-sharing subjects, asked the edit's relation
    and scored by top-1 kept (``token_sharing``; default: none). ``base_top1[i]`` holds the unedited
    model's top-1 of edit i's neighbours, then of its mined subjects.
    """
    others = others or Bystanders.of(manifest)
    edits = []
    for i, e in enumerate(manifest.edits):
        held, mined = others.held[i], others.mined[i]
        old = e.target_true or (old_objects[i] if old_objects else None)
        rewrite = [e.prompt]
        paraphrases = list(e.paraphrases)
        answered = [n for n in e.neighbors if n.answer]
        prompts = rewrite + paraphrases
        pairs_prompts = prompts * (2 if old else 1) + [n.prompt for n in answered] * 2
        pairs_targets = ([e.target] * len(prompts) + ([old] * len(prompts) if old else [])
                         + [e.target] * len(answered) + [n.answer for n in answered])
        nll = target_nll(lm, pairs_prompts, pairs_targets).tolist()
        p = [math.exp(-x) for x in nll]
        n_pr = len(prompts)
        p_new, p_old = p[:n_pr], (p[n_pr:2 * n_pr] if old else [None] * n_pr)
        q = p[(2 if old else 1) * n_pr:]
        p_nb_target, p_nb_answer = q[: len(answered)], q[len(answered):]
        mined_prompts = [fill(e.relation, s) for s in mined]
        # one batched forward: rewrite, paraphrases, neighbours, mined subjects -> their top-1 tokens
        top = _top1(lm, prompts + [n.prompt for n in e.neighbors] + mined_prompts)
        first = _first_token(lm, e.target)
        subject_last = lm.tokenizer(e.subject).input_ids[-1]

        def shares_last_token(prompt: str) -> bool:  # its subject ends in the edited subject's last token
            other = subject_of(e.relation, prompt)
            return other is not None and lm.tokenizer(other).input_ids[-1] == subject_last

        def row(prompt, pn, po, t):
            return {"prompt": prompt, "p_target": pn, "p_old": po,
                    "success": (pn > po) if po is not None else (t == first), "top1_is_target": t == first}

        rows = [row(pr, pn, po, t) for pr, pn, po, t in zip(prompts, p_new, p_old, top)]
        neighbors, j = [], 0
        for k, n in enumerate(e.neighbors):
            t = top[n_pr + k]
            kept = base_top1 is None or t == base_top1[i][k]
            if n.answer:
                neighbors.append({"prompt": n.prompt, "answer": n.answer, "p_answer": p_nb_answer[j],
                                  "p_target": p_nb_target[j], "success": p_nb_answer[j] > p_nb_target[j],
                                  "top1_kept": kept})
                j += 1
            else:
                neighbors.append({"prompt": n.prompt, "answer": None, "success": kept, "top1_kept": kept})
            neighbors[-1]["shares_last_token"] = shares_last_token(n.prompt)
            neighbors[-1]["held"] = mentions_held(n.prompt, held)
        n_nb = len(e.neighbors)
        sharing = []
        for k, (subject, prompt) in enumerate(zip(mined, mined_prompts)):
            t, base = top[n_pr + n_nb + k], None if base_top1 is None else base_top1[i][n_nb + k]
            sharing.append({"subject": subject, "prompt": prompt, "top1": t, "base_top1": t if base is None else base,
                            "top1_kept": base is None or t == base})
        edits.append({"index": i, "old_object": old, "rewrite": rows[0], "paraphrases": rows[1:],
                      "neighbors": neighbors, "held": list(held), "token_sharing": sharing, "top1": top})
    return {"edits": edits, "metrics": manifest_metrics(edits)}


def manifest_metrics(edits: list[dict]) -> dict[str, float]:
    """ES/PS/NS (% successes), EM/PM/NM (mean probability margins, %), S, and top-1 rates.

    Rates are averaged over each edit's prompts first, then over edits (as COUNTERFACT does per record).
    Neighbours marked ``held`` (they mention a subject the edit held fixed) count nowhere. NS_tok is over
    the token-sharing subjects: the neighbours whose subject shares the edited subject's last token (the
    bleed ROME is prone to) and the mined ``token_sharing`` subjects (success: top-1 kept).
    """
    def mean(xs):
        xs = [x for x in xs if x is not None]
        return 100.0 * sum(xs) / len(xs) if xs else None

    scored = [{**e, "neighbors": [r for r in e["neighbors"] if not r.get("held")]} for e in edits]

    def per_edit(key, value, among=scored):
        inner = [mean([value(r) for r in e[key]]) for e in among]
        return mean([x / 100.0 for x in inner if x is not None])

    margin = lambda r: (r["p_target"] - r["p_old"]) if r.get("p_old") is not None else None  # noqa: E731
    answer_margin = lambda r: (r["p_answer"] - r["p_target"]) if r["answer"] else None  # noqa: E731
    out = {
        "ES": mean([e["rewrite"]["success"] for e in edits]),
        "EM": mean([margin(e["rewrite"]) for e in edits]),
        "PS": per_edit("paraphrases", lambda r: r["success"]),
        "PM": per_edit("paraphrases", margin),
        "NS": per_edit("neighbors", lambda r: r["success"]),
        "NM": per_edit("neighbors", answer_margin),
        "rewrite_top1": mean([e["rewrite"]["top1_is_target"] for e in edits]),
        "paraphrase_top1": per_edit("paraphrases", lambda r: r["top1_is_target"]),
        "neighbor_top1_kept": per_edit("neighbors", lambda r: r["top1_kept"]),
    }
    present = [out[k] for k in ("ES", "PS", "NS") if out[k] is not None]
    out["S"] = harmonic_mean(present) if present else None
    tok = [{"neighbors": [r for r in e["neighbors"] if r.get("shares_last_token")]
            + [{"answer": None, "success": r["top1_kept"]} for r in e.get("token_sharing", [])]} for e in scored]
    tok_rows = [r for e in tok for r in e["neighbors"]]
    if tok_rows:
        out["NS_tok"] = per_edit("neighbors", lambda r: r["success"], tok)
        out["NM_tok"] = per_edit("neighbors", answer_margin, tok)
        out["NS_tok_low"], out["NS_tok_high"] = wilson_ci(sum(r["success"] for r in tok_rows), len(tok_rows))
        out["S+"] = harmonic_mean(present + [out["NS_tok"]])
    return {k: v for k, v in out.items() if v is not None}


def base_references(lm: LoadedModel, manifest, others: Bystanders | None = None) -> tuple[list[str], list[list[int]]]:
    """What every later score of a manifest compares with, read from the model as it is now (the base).

    Returns each edit's old object (``target_true``, else the model's own top-1 answer) and the
    top-1 token of each of its neighbours, then of its mined subjects (``others``): score_manifest's
    ``old_objects`` and ``base_top1``.
    """
    pre = score_manifest(lm, manifest, others=others)
    old = [e["old_object"] or lm.tokenizer.decode(e["top1"][0]).strip() for e in pre["edits"]]
    n_prompts = [1 + len(e.paraphrases) for e in manifest.edits]
    base_top1 = [e["top1"][n:] for e, n in zip(pre["edits"], n_prompts)]
    return old, base_top1


def evaluate_manifest(edited, manifest, deltas: list, sharing: TokenSharing | None = None) -> dict:
    """A manifest's edits scored on the base model (pre) and on base + ``deltas`` (post).

    ``sharing``: the reference names that token-sharing subjects are mined from (none: only the
    manifest's own neighbours count in NS_tok). ``other_subjects`` (in the result): per edit, the
    subjects held by construction and the mined subjects asked, with those whose top-1 the deltas moved.
    ``edited`` is a compose.EditedModel; it is left at the base model.
    """
    lm = edited.lm
    edited.compose([])
    others = Bystanders.of(manifest, deltas, sharing, lm.tokenizer)
    old, base_top1 = base_references(lm, manifest, others)
    pre = score_manifest(lm, manifest, old, base_top1, others)  # the same comparisons as post
    edited.compose(deltas)
    try:
        post = score_manifest(lm, manifest, old, base_top1, others)
    finally:
        edited.compose([])
    return {"pre": pre["metrics"], "post": post["metrics"],
            "edits": [{"pre": a, "post": b} for a, b in zip(pre["edits"], post["edits"])],
            "other_subjects": [what_else_moved(lm, e, scored) for e, scored in zip(manifest.edits, post["edits"])]}


def what_else_moved(lm: LoadedModel, edit, scored: dict) -> dict:
    """The report's summary of one edit's other subjects: held by construction, mined and asked, moved
    (a mined subject whose top-1 token is no longer the unedited model's: before -> after, decoded)."""
    decode = lambda t: lm.tokenizer.decode(t)  # noqa: E731
    return {"index": scored["index"], "subject": edit.subject, "held": scored["held"],
            "asked": [r["subject"] for r in scored["token_sharing"]],
            "moved": [{"subject": r["subject"], "before": decode(r["base_top1"]), "after": decode(r["top1"])}
                      for r in scored["token_sharing"] if not r["top1_kept"]]}


# --------------------------------------------------------------------------------------------------
# Damage on generic text: per-token NLL and top-1 predictions of a held-out text
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def text_predictions(lm: LoadedModel, text: str, window: int = 256,
                     max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL of every predicted token of ``text`` (its first ``max_tokens`` tokens, when given) and the
    model's top-1 prediction there: (n,), (n,).

    The text is cut into consecutive windows of ``window`` tokens, each scored on its own (after
    <bos> where the model uses one, so every token is predicted; otherwise a window's first token
    is context only). Perplexity = exp(mean NLL).
    """
    if window < 2:
        raise ValueError(f"the perplexity window must be at least 2 tokens, got {window}")
    ids = lm.tokenizer(text, add_special_tokens=False).input_ids[:max_tokens]
    head = [lm.tokenizer.bos_token_id] if lm.adds_bos else []
    nll, top1 = [], []
    with flush_denormals():
        for start in range(0, len(ids), window):
            seq = torch.tensor([head + ids[start:start + window]])
            if seq.shape[1] < 2:
                continue
            hidden = final_hidden(lm.model, seq, torch.ones_like(seq))[0, :-1]  # (T-1, d)
            logp = logits_at(lm.model, hidden).log_softmax(-1)  # (T-1, vocab)
            nxt = seq[0, 1:].to(logp.device)
            nll.append(-logp.gather(1, nxt[:, None])[:, 0].cpu())
            top1.append(logp.argmax(-1).cpu())
    if not nll:
        raise ValueError("the held-out text has fewer than 2 tokens")
    return torch.cat(nll), torch.cat(top1)


@torch.no_grad()
def sample_continuations(lm: LoadedModel, prompts: list[str], max_new_tokens: int, top_k: int,
                         generator: torch.Generator) -> list[str]:
    """Top-k sampling for a batch of prompts with a KV cache, one forward pass per new token.

    Prompts are left-padded and positions counted from each prompt's first real token, so every row
    sees what it would see alone. Reproducible given the generator.
    """
    model, tok = lm.model, lm.tokenizer
    seqs = [tok(p).input_ids for p in prompts]
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(s)) + s for s in seqs])  # (B, T)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])  # (B, T)
    banned = torch.tensor(sorted(set(tok.all_special_ids)), dtype=torch.long)
    backbone = model.base_model
    new, past, step_ids = [], new_cache(backbone), ids
    with flush_denormals():
        for _ in range(max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]  # (B, t)
            res = backbone(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                           **cache_kwargs(backbone, past))  # the cache is filled in place
            logits = logits_at(model, res.last_hidden_state[:, -1])  # (B, vocab)
            logits[:, banned] = -torch.inf
            top = logits.topk(top_k, dim=-1)  # (B, k)
            probs, indices = top.values.softmax(-1).cpu(), top.indices.cpu()  # sampled on the host (a CPU generator)
            step_ids = indices.gather(1, torch.multinomial(probs, 1, generator=generator))
            new.append(step_ids)  # (B, 1)
            mask = torch.cat([mask, torch.ones_like(step_ids)], 1)
    return tok.batch_decode(torch.cat(new, 1), skip_special_tokens=True)
