"""Prompts as token batches: subject positions, teacher-forced targets, and their log-probabilities.

Shared by the engine (k*, v*) and the evaluation, so both score a target in exactly the same way:
the prompt and the target are tokenised separately, the target is fed teacher-forced, and only the
positions that predict a target token go through the output head.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .models import final_hidden, logits_at

# The longest prompt read from the command line (`generate`, `trace`) or a records file (docs/limits.md):
# a manifest's prompt is at most a relation (1,000) with a subject (200) in it; the forward passes of a
# prompt cost time and memory linear to quadratic in its length.
MAX_PROMPT_CHARS = 2000


def continuation(target: str) -> str:
    """How a target follows its prompt: 'medicine' -> ' medicine' (kept as is if it has a space)."""
    return target if target[:1].isspace() else " " + target


def fill(template: str, subject: str) -> str:
    return template.replace("{}", subject, 1)


def subject_last_index(tokenizer, template: str, subject: str) -> int:
    """Position of the last subject token in ``tokenizer(fill(template, subject))``.

    Only the text up to the end of the subject is tokenised: what follows cannot move it.
    """
    head = template[: template.index("{}")] + subject
    return len(tokenizer(head).input_ids) - 1


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T) 1 for real tokens

    @property
    def lengths(self) -> torch.Tensor:  # (B,)
        return self.attention_mask.sum(1)


def pad(sequences: list[list[int]], pad_id: int) -> Batch:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return Batch(ids, mask)


def encode(tokenizer, texts: list[str]) -> Batch:
    return pad([tokenizer(t).input_ids for t in texts], tokenizer.pad_token_id)


@dataclass
class TargetBatch:
    """Prompts with their targets appended (minus the last target token), and where to score."""

    batch: Batch
    rows: torch.Tensor  # (n,) sequence of each target token
    positions: torch.Tensor  # (n,) position whose next-token distribution predicts it
    token_ids: torch.Tensor  # (n,) the target token
    num_pairs: int  # one sequence per (prompt, target) pair, so ``rows`` also names the pair


def teacher_forced(tokenizer, prompts: list[str], targets: list[str]) -> TargetBatch:
    sequences, rows, positions, token_ids = [], [], [], []
    for i, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        p = tokenizer(prompt).input_ids
        t = tokenizer(continuation(target), add_special_tokens=False).input_ids
        if not t:
            raise ValueError(f"target {target!r} tokenises to nothing")
        sequences.append(p + t[:-1])
        rows += [i] * len(t)
        positions += range(len(p) - 1, len(p) - 1 + len(t))
        token_ids += t
    long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return TargetBatch(pad(sequences, tokenizer.pad_token_id), long(rows), long(positions),
                       long(token_ids), len(prompts))


def target_logprobs(model, tb: TargetBatch) -> torch.Tensor:
    """log P(target token | prefix) for every target token: (n,). Differentiable through hooks."""
    hidden = final_hidden(model, tb.batch.input_ids, tb.batch.attention_mask)  # (B, T, d)
    logits = logits_at(model, hidden[tb.rows, tb.positions])  # (n, vocab)
    return logits.log_softmax(-1).gather(1, tb.token_ids.to(logits.device)[:, None])[:, 0]


def mean_per_pair(values: torch.Tensor, tb: TargetBatch) -> torch.Tensor:
    """Average per-token values over each (prompt, target) pair: (n,) -> (num_pairs,)."""
    rows = tb.rows.to(values.device)
    total = values.new_zeros(tb.num_pairs).index_add(0, rows, values)
    count = values.new_zeros(tb.num_pairs).index_add(0, rows, torch.ones_like(values))
    return total / count


@contextlib.contextmanager
def flush_denormals():
    """Treat denormal floats as zero while inside.

    Softmax outputs over a 262k vocabulary are full of denormals, and a CPU matmul over them (the
    output head's backward pass) runs ~15x slower: measured 2.8 s vs 0.18 s for 21 rows of Gemma.
    """
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
