"""The batched forwards of Eq. 4 (``rome.value``): every token of every prompt at every step, or the tokens
before each prompt's last subject token run once, into a KV cache (they cannot depend on δ, which enters
at the last subject token or later)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch

from .models import cache_kwargs, final_hidden, new_cache
from .prompts import pad


@dataclass
class _Forward:
    """A batch of prompts, run with δ hooked in at each prompt's last subject token."""

    run: Callable[[], torch.Tensor]  # () -> (m, d) final hidden states at the positions asked for
    delta_at: tuple[torch.Tensor, torch.Tensor]  # (rows, cols) of the last subject tokens in the batch run


def _full_forward(model, sequences: list[list[int]], subject_at: torch.Tensor,
                  read_at: tuple[torch.Tensor, torch.Tensor], pad_id: int) -> _Forward:
    """The reference computation: every step runs every token of every prompt (right padding).

    sequences: B token lists; subject_at: (B,) index of each last subject token; read_at: (rows (m,),
    positions (m,)) of the final hidden states wanted.
    """
    batch = pad(sequences, pad_id)  # (B, T)
    rows, positions = read_at
    return _Forward(lambda: final_hidden(model, batch.input_ids, batch.attention_mask)[rows, positions],
                    (torch.arange(len(sequences)), subject_at))


def _cached_forward(model, sequences: list[list[int]], subject_at: torch.Tensor,
                    read_at: tuple[torch.Tensor, torch.Tensor], pad_id: int) -> _Forward:
    """Like ``_full_forward``, but the tokens before the last subject token run once, into a KV cache.

    δ enters at the last subject token, so by causality the keys and values of every earlier token, at
    every layer, are the same at every step. Each row is shifted right so that its last subject token
    lands in column P (left padding before it, right padding after it, as in batched generation):

        row i:  [pad .. pad  tokens before subject[-1] | subject[-1]  rest of the row  pad .. pad]
                 columns 0 .. P-1: the prefix,         | columns P .. P+S-1: the suffix, run at
                 run once, no grad, kept as keys/values | every step against the cached prefix

    Explicit position ids keep every token at its unshifted position, and the real tokens of a row
    stay contiguous (sliding windows see the same neighbours): the result equals the uncached
    computation up to float rounding.
    """
    B = len(sequences)
    lengths = torch.tensor([len(s) for s in sequences])  # (B,)
    P = int(subject_at.max())  # width of the prefix part
    S = int((lengths - subject_at).max())  # width of the suffix part
    shift = P - subject_at  # (B,) left padding of each row
    input_ids = torch.full((B, P + S), pad_id, dtype=torch.long)  # (B, P + S)
    attention_mask = torch.zeros((B, P + S), dtype=torch.long)  # (B, P + S) 1 for real tokens
    position_ids = torch.zeros((B, P + S), dtype=torch.long)  # (B, P + S) 0 on (masked) padding
    for i, seq in enumerate(sequences):
        s, n = int(shift[i]), len(seq)
        input_ids[i, s:s + n] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, s:s + n] = 1
        position_ids[i, s:s + n] = torch.arange(n)

    backbone = model.base_model  # no output head: the caller applies it to the positions it needs
    prefix_cache = None  # (P == 0: no row has a token before its subject; nothing to cache)
    if P > 0:
        prefix_cache = new_cache(backbone)  # filled in place by the forward
        with torch.no_grad():
            backbone(input_ids=input_ids[:, :P], attention_mask=attention_mask[:, :P],
                     position_ids=position_ids[:, :P], use_cache=True, **cache_kwargs(backbone, prefix_cache))
    rows, positions = read_at
    cols = positions + shift[rows] - P  # (m,) suffix column of each position asked for

    def run() -> torch.Tensor:  # (m, d)
        cache = copy.deepcopy(prefix_cache)  # a forward appends its tokens to the cache it is given
        hidden = backbone(input_ids=input_ids[:, P:], attention_mask=attention_mask,  # mask: (B, P + S)
                          position_ids=position_ids[:, P:], use_cache=cache is not None,
                          **cache_kwargs(backbone, cache)).last_hidden_state  # (B, S, d)
        return hidden[rows, cols]

    return _Forward(run, (torch.arange(B), torch.zeros(B, dtype=torch.long)))  # subject[-1]: column 0
