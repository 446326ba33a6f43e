"""Scoring prompts: target probabilities by mean per-token NLL, and next-token rankings.

One forward pass scores a whole batch of (prompt, target) pairs; only the positions that predict a
target token go through the output head.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .models import LoadedModel, final_hidden, logits_at
from .prompts import encode, fill, flush_denormals, mean_per_pair, target_logprobs, teacher_forced
from .rome import EditRequest


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


# --------------------------------------------------------------------------------------------------
# COUNTERFACT records and their scores (ES/PS/NS and magnitudes)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CounterfactRecord:
    case_id: int
    subject: str
    relation: str  # template with {} for the subject
    target_new: str
    target_true: str
    paraphrases: tuple[str, ...]
    neighborhood: tuple[str, ...]  # prompts whose answer is target_true
    generation: tuple[str, ...] = ()
    attribute: tuple[str, ...] = ()

    @property
    def request(self) -> EditRequest:
        return EditRequest(self.subject, self.relation, self.target_new, self.target_true)


def _record(raw: dict) -> CounterfactRecord:
    if "requested_rewrite" in raw:  # the paper's schema
        rw = raw["requested_rewrite"]
        return CounterfactRecord(int(raw["case_id"]), rw["subject"], rw["prompt"], rw["target_new"]["str"],
                                 rw["target_true"]["str"], tuple(raw["paraphrase_prompts"]),
                                 tuple(raw["neighborhood_prompts"]), tuple(raw.get("generation_prompts", ())),
                                 tuple(raw.get("attribute_prompts", ())))
    # the flat schema of editing toolkits: the prompt has the subject filled in
    if raw["subject"] not in raw["prompt"]:
        raise KeyError("subject (not found in the prompt)")
    return CounterfactRecord(int(raw["case_id"]), raw["subject"], raw["prompt"].replace(raw["subject"], "{}", 1),
                             raw["target_new"], raw["ground_truth"], (raw["rephrase_prompt"],),
                             (raw["locality_prompt"],))


def load_counterfact(path: str | Path) -> list[CounterfactRecord]:
    """COUNTERFACT records in the paper's schema or the flat one (both may be mixed)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read COUNTERFACT records ({e})") from e
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    records = []
    for i, raw in enumerate(data):
        try:
            records.append(_record(raw))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: record {i}: missing or invalid field {e}") from e
    return records


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
    """Per-record success rates and magnitudes (%, means over the record's prompts).

    ES/PS: P[new] > P[true]; NS: P[true] > P[new]; EM/PM/NM: the matching probability differences.
    Probabilities are exp(−mean per-token NLL).
    """
    def rate(pairs, new_wins: bool) -> float:
        return 100.0 * sum((a < b) if new_wins else (b < a) for a, b in pairs) / len(pairs)

    def margin(pairs, new_wins: bool) -> float:
        diffs = [math.exp(-a) - math.exp(-b) for a, b in pairs]
        return 100.0 * sum(diffs if new_wins else [-d for d in diffs]) / len(pairs)

    out = {}
    for short, group, new_wins in (("E", "rewrite", True), ("P", "paraphrase", True), ("N", "neighborhood", False)):
        if scores.get(group):
            out[short + "S"] = rate(scores[group], new_wins)
            out[short + "M"] = margin(scores[group], new_wins)
    return out


def harmonic_mean(values: list[float]) -> float:
    return 0.0 if any(v <= 0 for v in values) else len(values) / sum(1.0 / v for v in values)
