"""The update's size: margins of the new object over the old one, and the least share of an update that keeps
one (``shrink_margin`` of the ``entity`` insert, ``stack.margin``; docs/scale.md)."""

from __future__ import annotations

from typing import Callable

import torch

from .models import LoadedModel, final_hidden, logits_at, read_weight, write_weight
from .prompts import flush_denormals, mean_per_pair, target_logprobs, teacher_forced


def least_scale(margin: Callable[[float], float], target: float, steps: int) -> float:
    """The smallest s in (0, 1], to 2^-steps, with margin(s) ≥ target, by bisection (margin taken as
    increasing in s); 1 when margin(1) already falls short.

    Every term of Eq. 2's update is linear in the residual δ = v* − W k* (the protected keys', the
    prompt key's and the family term's constraints alike), so s · Δ is the insert of v = W k* + s δ."""
    if margin(1.0) < target:
        return 1.0
    lo, hi = 0.0, 1.0  # margin(hi) ≥ target; margin(lo) is not known to be
    for _ in range(steps):
        mid = (lo + hi) / 2
        if margin(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi


@torch.no_grad()
def next_token(lm: LoadedModel, prompt: str) -> str:
    """The model's most probable next token after ``prompt``, as text (the old object of an edit that
    names none)."""
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids  # (1, T)
    hidden = final_hidden(lm.model, ids, torch.ones_like(ids))[0, -1]  # (d,)
    text = lm.tokenizer.decode([int(logits_at(lm.model, hidden[None]).argmax(-1)[0])])
    return text.strip() or text


@torch.no_grad()
def margins(lm: LoadedModel, prompts: list[str], targets: list[str], olds: list[str],
            batch_size: int = 16) -> torch.Tensor:
    """Per prompt: mean per-token log P(target | prompt) − log P(old | prompt), (n,); 2 · batch_size
    sequences a forward pass."""
    out = []
    with flush_denormals():
        for i in range(0, len(prompts), batch_size):
            p, t, o = prompts[i:i + batch_size], targets[i:i + batch_size], olds[i:i + batch_size]
            tb = teacher_forced(lm.tokenizer, p * 2, t + o)
            nll = -mean_per_pair(target_logprobs(lm.model, tb).float(), tb)  # (2b,)
            out.append((nll[len(p):] - nll[:len(p)]).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def margin_under(lm: LoadedModel, module_name: str, u: torch.Tensor, v: torch.Tensor, prompt: str,
                 target: str, old: str) -> Callable[[float], float]:
    """s -> mean per-token log P(target | prompt) − log P(old | prompt) with W + s · u vᵀ in place of W.

    Each call writes W + s u vᵀ; the caller restores W."""
    w0 = read_weight(lm.model, module_name)  # (d_out, d_in)
    update = (u.float() @ v.float().T) if u.dim() == 2 else torch.outer(u.float(), v.float())  # (d_out, d_in)
    update = update.to(w0.device)

    def margin(s: float) -> float:
        write_weight(lm.model, module_name, w0.float() + s * update)  # rounded once to W's dtype
        return float(margins(lm, [prompt], [target], [old])[0])

    return margin
