"""Scoring prompts: target probabilities by mean per-token NLL, and next-token rankings.

One forward pass scores a whole batch of (prompt, target) pairs; only the positions that predict a
target token go through the output head.
"""

from __future__ import annotations

import math

import torch

from .models import LoadedModel, final_hidden, logits_at
from .prompts import encode, flush_denormals, mean_per_pair, target_logprobs, teacher_forced


@torch.no_grad()
def target_nll(lm: LoadedModel, prompts: list[str], targets: list[str], batch_size: int = 32) -> torch.Tensor:
    """Mean per-token negative log-likelihood of each target after its prompt: (n,)."""
    out = []
    with flush_denormals():
        for i in range(0, len(prompts), batch_size):
            tb = teacher_forced(lm.tokenizer, prompts[i:i + batch_size], targets[i:i + batch_size])
            out.append(-mean_per_pair(target_logprobs(lm.model, tb), tb))
    return torch.cat(out) if out else torch.zeros(0)


def target_prob(lm: LoadedModel, prompt: str, target: str) -> float:
    """exp(−mean per-token NLL): the probability for a one-token target, its geometric mean otherwise."""
    return math.exp(-target_nll(lm, [prompt], [target])[0].item())


@torch.no_grad()
def next_token_top(lm: LoadedModel, prompts: list[str], k: int = 5) -> list[list[tuple[str, float]]]:
    """The k most likely next tokens (decoded) and their probabilities, for each prompt."""
    with flush_denormals():
        b = encode(lm.tokenizer, prompts)
        hidden = final_hidden(lm.model, b.input_ids, b.attention_mask)  # (B, T, d)
        probs = logits_at(lm.model, hidden[torch.arange(len(prompts)), b.lengths - 1]).softmax(-1)  # (B, V)
        top = probs.topk(k, dim=-1)
    return [[(lm.tokenizer.decode(int(i)), float(p)) for p, i in zip(vals, idx)]
            for vals, idx in zip(top.values, top.indices)]


@torch.no_grad()
def greedy_continuation(lm: LoadedModel, prompt: str, max_new_tokens: int = 20) -> str:
    """Greedy decoding, one full forward pass per token (short outputs; deterministic)."""
    ids = lm.tokenizer(prompt).input_ids
    with flush_denormals():
        for _ in range(max_new_tokens):
            x = torch.tensor([ids])
            nxt = int(logits_at(lm.model, final_hidden(lm.model, x, torch.ones_like(x))[0, -1]).argmax())
            if nxt == lm.tokenizer.eos_token_id:
                break
            ids.append(nxt)
    return lm.tokenizer.decode(ids[len(lm.tokenizer(prompt).input_ids):], skip_special_tokens=True)


def edit_probabilities(lm: LoadedModel, prompt: str, target: str, target_true: str | None) -> dict:
    """P[target] and P[target_true] (when known) on one prompt."""
    targets = [target] + ([target_true] if target_true else [])
    nll = target_nll(lm, [prompt] * len(targets), targets)
    out = {"p_target": math.exp(-nll[0].item())}
    if target_true:
        out["p_true"] = math.exp(-nll[1].item())
    return out
