"""ROME: Rank-One Model Editing (Meng et al. 2022), one readable function per equation.

    key     Eq. 3  k* = mean_j k(x_j + s)                    the subject's key, prefix-averaged
    value   Eq. 4  v* = W k* + δ,  δ = argmin L(δ)           the value that makes the model say o*
    insert  Eq. 2  Ŵ = W + Λ (C⁻¹k*)ᵀ                        the least-disturbing rank-one update

Shapes: d_in is the width of the key (the MLP's hidden size), d_out the width of the value (the
model width). W is always handled as (d_out, d_in), whatever the storage orientation.

Precision and devices (docs/method.md, "Precision and devices"): keys, values, δ and the factors are
float32 whatever the model's dtype; the solves are float64; the update is added to W in W's own dtype
and on W's device. Every tensor made here is made on the device of the tensor it works with.
"""

from __future__ import annotations

import copy
import hashlib
import random
import time
from pathlib import Path
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable

import torch

from .hooks import on_output, run_with_hooks
from .models import (LoadedModel, cache_kwargs, edited_module, edited_module_name, final_hidden, keys_at, logits_at,
                     module_device, new_cache, read_weight, writable_weight, write_weight)
from .prompts import (encode, fill, flush_denormals, mean_per_pair, pad, subject_last_index, target_logprobs,
                      teacher_forced)
from .protect import NameIndex, bare_keys, choose_protected, leak, reference_names, residual_share


@dataclass(frozen=True)
class RomeParams:
    """Hyper-parameters (the ``rome:`` section of params.yaml)."""

    layer: int = 1  # Gemma-3-270M's best S on the dev split (docs/layer-sweep.md)
    symmetric_keys: bool = True  # r-ROME: prefix-averaged k* on both sides of Λ (False: the paper's code)
    prefix_lengths: tuple[int, ...] = (5, 10)  # tokens generated per context prefix, per group
    prefixes_per_length: int = 5  # 11 prompts for v* (docs/speed.md: 10 gave the same S at twice the time)
    prefix_starts: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
    seed: int = 0  # for the context prefixes
    lr: float = 0.1  # Adam step; the paper's 0.5 overshoots Gemma's small values (‖W k*‖ ≈ 3)
    steps: int = 20
    early_stop_nll: float = 0.3  # stop once the mean target NLL is below this (0.05 before: same S, more steps)
    weight_decay: float = 0.5  # on (‖δ‖ / ‖W k*‖)²
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 4.0  # ‖δ‖ ≤ factor · ‖W k*‖
    essence_prompt: str = "{} is a"
    # Entity-level specificity (docs/specificity.md): keys of other subjects that share the edited
    # subject's last token are held fixed by the insert (Eq. 2 with more constraints).
    protect: int = 0  # at most this many automatically mined protected subjects per edit (0: none)
    protect_sources: tuple[str, ...] = ("wikipedia",)  # reference entity names: 'wikipedia' or files
    protect_ridge: float = 1e-6  # ridge on (Kᵀ C⁻¹ K), relative to its mean diagonal
    protect_min_residual: float = 0.05  # refuse protected keys that leave less of k* than this to edit
    protect_weight: float = 0.0  # α: C + α·(tr C / tr F)·F, F the second moment of the subject's family (0: off)
    protect_siblings: int = 0  # family members made up: other reference names' first words + the last word
    prompt_key: bool = False  # the edit's change also at the rewrite prompt's own key (still rank one)
    prefix_keys: bool = False  # ... and at each context prefix's key, not only at their mean k* (still rank one)
    family_centroid: bool = False  # hold the mean key of the subject's family fixed (one more protected key)
    value_in_place: bool = False  # v*: δ optimised with the insert's own update δ vᵀ at every token (not at k* only)
    protect_max_energy: float = 2.0  # the family term may raise tr(ΔCΔᵀ) at most this many times (α halved until)
    family_kl: float = 0.0  # v*: weight of the KL term on family members' prompts, each given its leak of δ (0: off)
    family_kl_prompts: int = 8  # ... over this many family members, the leakiest under the insert
    # The update's size (docs/scale.md): v* overshoots (a median margin of ~9 nats on its own prompt), and
    # the excess is damage that accumulates in a stack.
    shrink_margin: float = 0.0  # scale δ down to the least share at which the prompt keeps this margin (0: off)
    shrink_steps: int = 5  # bisection steps for that share (resolution 2⁻ⁿ)

    @classmethod
    def from_dict(cls, d: dict | None) -> "RomeParams":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ROME hyper-parameter(s): {', '.join(sorted(unknown))}")
        for f in fields(cls):
            if f.name in d and isinstance(getattr(cls, f.name, None), tuple):
                d[f.name] = tuple(d[f.name])
        return cls(**d)

    def to_dict(self) -> dict:
        """As params.yaml writes it; the shrink's fields and the later insert options only when on, so that run
        folders and deltas written before they existed still match an unchanged configuration."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if not self.shrink_margin:
            del d["shrink_margin"], d["shrink_steps"]
        for optional in ("prefix_keys", "family_centroid", "value_in_place"):
            if not d[optional]:
                del d[optional]
        return d


def rank_one(params: RomeParams) -> RomeParams:
    """The same hyper-parameters with the plain rank-one insert of Eq. 2: no mined protected keys, no
    family term, no prompt key (a manifest's own protect list and neighbours still hold)."""
    return replace(params, protect=0, protect_weight=0.0, protect_siblings=0, prompt_key=False, prefix_keys=False,
                   family_centroid=False, value_in_place=False, protect_max_energy=2.0, family_kl=0.0)


@dataclass(frozen=True)
class EditRequest:
    subject: str
    relation: str  # a prompt template with {} where the subject goes
    target: str  # the new object o*
    target_true: str | None = None  # the old object, for reporting
    protect: tuple[str, ...] = ()  # subjects whose keys the insert must leave unchanged

    @property
    def prompt(self) -> str:
        return fill(self.relation, self.subject)


@dataclass
class RankOneUpdate:
    """ΔW = u vᵀ on the (d_out, d_in) view of one module."""

    module: str
    layer: int
    u: torch.Tensor  # (d_out,) Λ
    v: torch.Tensor  # (d_in,)  C⁻¹ k*


@dataclass
class EditResult:
    request: EditRequest
    update: RankOneUpdate
    k_star: torch.Tensor  # (d_in,)
    v_star: torch.Tensor  # (d_out,)
    nll_trace: list[float]  # mean target NLL at each v* step
    timings: dict[str, float] = field(default_factory=dict)
    protected: list[str] = field(default_factory=list)  # subjects whose keys the insert held fixed
    protected_keys: torch.Tensor | None = None  # (m, d_in) those subjects' keys (two each; then the family's
    # mean key when family["centroid"]), None when m = 0
    held: int = 0  # keys of earlier edits (this manifest's, or the stack's it was applied onto) held fixed
    family: dict = field(default_factory=dict)  # the family term used: {alpha, energy_ratio[, kl_prompts]}
    scale: float = 1.0  # the share of δ kept (``shrink_margin``); v_star is W k* + scale · δ


# --------------------------------------------------------------------------------------------------
# Context prefixes x_j (Eq. 3 and 4 average over them)
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def context_prefixes(lm: LoadedModel, params: RomeParams) -> list[str]:
    """Short texts sampled from the model itself (top-5 sampling, seeded), each ending in '. '.

    The bare prompt (prefix '') comes first. Returns 1 + len(prefix_lengths) · prefixes_per_length.
    """
    tok, model = lm.tokenizer, lm.model
    generator = torch.Generator().manual_seed(params.seed)
    banned = torch.tensor(sorted(set(tok.all_special_ids)), dtype=torch.long)
    prefixes = [""]
    for length in params.prefix_lengths:
        starts = [params.prefix_starts[i % len(params.prefix_starts)] for i in range(params.prefixes_per_length)]
        seqs = [tok(s).input_ids for s in starts]
        for _ in range(length):
            b = pad(seqs, tok.pad_token_id)
            hidden = final_hidden(model, b.input_ids, b.attention_mask)  # (B, T, d)
            logits = logits_at(model, hidden[torch.arange(len(seqs)), b.lengths - 1])  # (B, vocab)
            logits[:, banned] = -torch.inf
            top = logits.topk(5, dim=-1)
            probs, indices = top.values.softmax(-1).cpu(), top.indices.cpu()  # sampled on the host: seeded alike everywhere
            pick = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            nxt = indices.gather(1, pick)[:, 0]
            seqs = [s + [int(t)] for s, t in zip(seqs, nxt)]
        for s in seqs:
            text = tok.decode(s, skip_special_tokens=True).replace("{", "").replace("}", "")
            prefixes.append(" ".join(text.split()) + ". ")
    return prefixes


# --------------------------------------------------------------------------------------------------
# Eq. 3: the key
# --------------------------------------------------------------------------------------------------


def subject_keys(lm: LoadedModel, layer: int, templates: list[str], subject: str) -> torch.Tensor:
    """The key at the last subject token of each filled template: (N, d_in), float32."""
    batch = encode(lm.tokenizer, [fill(t, subject) for t in templates])
    where = torch.tensor([subject_last_index(lm.tokenizer, t, subject) for t in templates])
    keys = keys_at(lm.model, [layer], batch.input_ids, batch.attention_mask)[layer]  # (N, T, d_in)
    return keys[torch.arange(len(templates)), where].float()


def module_output(module: torch.nn.Module, k: torch.Tensor) -> torch.Tensor:
    """W k for keys k (n, d_in) -> (n, d_out) float32: the module runs in its own dtype on its own
    device (for a module accelerate offloads, its execution device); the result comes back to k's device."""
    return module(k.to(module_device(module), module.weight.dtype)).to(k.device, torch.float32)


def key(lm: LoadedModel, layer: int, subject: str, prefixes: list[str]) -> torch.Tensor:
    """Eq. 3: k* = (1/N) Σ_j k(x_j + s), the subject's key averaged over context prefixes. (d_in,)

    Causality makes the key at the last subject token independent of what follows the subject, so
    the template is just prefix + subject.
    """
    return subject_keys(lm, layer, [p + "{}" for p in prefixes], subject).mean(0)


# --------------------------------------------------------------------------------------------------
# Eq. 4: the value
# --------------------------------------------------------------------------------------------------


def _add_at(delta: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor | None = None):
    """A forward hook adding δ (d_out,) to the module output (B, T, d_out) at the given positions,
    times ``scale`` (one factor per position; default 1)."""

    def hook(_module, _inputs, output):
        where = torch.zeros(output.shape[:2] + (1,), dtype=torch.float32, device=output.device)  # (B, T, 1)
        where[rows, cols, 0] = 1.0 if scale is None else scale.to(output.device, torch.float32)
        # δ stays float32 (the optimiser's copy); the sum is rounded once to the activation's dtype
        return (output.float() + where * delta.to(output.device)).to(output.dtype)

    return hook


def _add_update(delta: torch.Tensor, direction: torch.Tensor):
    """A forward hook applying the rank-one update δ vᵀ itself: the module output (B, T, d_out) gets
    (vᵀk_t) δ at every position t, k_t the module's input there — what Ŵ = W + δ vᵀ computes."""

    def hook(_module, inputs, output):
        share = inputs[0].float() @ direction.to(output.device, torch.float32)  # (B, T)
        return (output.float() + share[..., None] * delta.to(output.device)).to(output.dtype)

    return hook


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


def _value_batch(tok, request: EditRequest, prefixes: list[str], essence_prompt: str, family: tuple[str, ...] = ()):
    """The prompts of Eq. 4 as one batch: the N rewrite prompts x_j + p, teacher-forced (the target
    appended but its last token), then the essence prompt p' in row N, then the relation asked of each
    of f family members (rows N + 1 ..).

    Returns (rewrite: the TargetBatch of the N rewrite prompts, sequences: N + 1 + f token lists,
    subject_at: (N + 1 + f,) index of each row's last subject token, read_at: (rows, positions), each
    (n + 1 + f,): the n positions that predict a target token, the last position of p', then the last
    position of each family prompt).
    """
    templates = [p + request.relation for p in prefixes]
    rewrite = teacher_forced(tok, [fill(t, request.subject) for t in templates], [request.target] * len(templates))
    essence = tok(fill(essence_prompt, request.subject)).input_ids
    others = [tok(fill(request.relation, s)).input_ids for s in family]
    sequences = [ids[:n].tolist() for ids, n in zip(rewrite.batch.input_ids, rewrite.batch.lengths)] + [essence] + others
    subject_at = torch.tensor([subject_last_index(tok, t, request.subject) for t in templates + [essence_prompt]]
                              + [subject_last_index(tok, request.relation, s) for s in family], dtype=torch.long)
    n = len(templates)
    read_at = (torch.cat([rewrite.rows, torch.arange(n, n + 1 + len(family))]),
               torch.cat([rewrite.positions, torch.tensor([len(essence) - 1] + [len(o) - 1 for o in others],
                                                          dtype=torch.long)]))
    return rewrite, sequences, subject_at, read_at


def value(lm: LoadedModel, layer: int, request: EditRequest, prefixes: list[str], k_star: torch.Tensor,
          params: RomeParams, family: tuple[tuple[str, float], ...] = (),
          direction: torch.Tensor | None = None) -> tuple[torch.Tensor, list[float]]:
    """Eq. 4: v* = W k* + δ, with δ minimising

        L(δ) = mean_j NLL(o* | x_j + p)  +  kl_factor · KL(P_δ[· | p'] ‖ P[· | p'])  +  wd · (‖δ‖/‖W k*‖)²
               + family_kl · mean_i KL(P_{ρ_i δ}[· | p_i] ‖ P[· | p_i])

    where δ is added to the module output at the last subject token of every prompt, p' is the
    essence prompt ("{subject} is a", scored at its last token), and ‖δ‖ is clamped to
    clamp_norm_factor · ‖W k*‖ after each Adam step. Returns (v* (d_out,), NLL per step).

    family: (s_i, ρ_i) pairs: other subjects, asked the edit's relation (p_i), and the share ρ_i of δ
    that the insert will add at their key (ρ_i = vᵀk_i / vᵀk* for the update u vᵀ; ``Rome.family_leaks``). The
    last term makes δ one that moves the subject and not, at their leak, its family.

    direction: the insert's v (d_in,), scaled so that vᵀk* = 1 (``value_in_place``). δ is then not added
    at the last subject token only, but applied as the update δ vᵀ itself, at every token of every
    prompt (``_add_update``): L is the loss of the edited model Ŵ = W + δ vᵀ. An insert that keeps its
    update off the subject's family moves other tokens' keys differently from k*'s; δ is chosen for
    the update that will be written, not for a stand-in.

    The rewrite prompts and p' run as one batch. Their tokens before the last subject token do not
    depend on δ: they run once, into a KV cache, and each step runs only the rest (``_cached_forward``;
    not with ``direction``: the update then changes every token).
    """
    return _value(lm, layer, request, prefixes, k_star, params, cache_prefix=direction is None, family=family,
                  direction=direction)


def _value(lm: LoadedModel, layer: int, request: EditRequest, prefixes: list[str], k_star: torch.Tensor,
           params: RomeParams, cache_prefix: bool, family: tuple[tuple[str, float], ...] = (),
           direction: torch.Tensor | None = None) -> tuple[torch.Tensor, list[float]]:
    """``value``; cache_prefix=False runs every token at every step (the reference the tests compare with)."""
    tok, model = lm.tokenizer, lm.model
    module = edited_module(model, layer)
    family = tuple(family) if params.family_kl > 0 else ()
    f = len(family)
    rewrite, sequences, subject_at, read_at = _value_batch(tok, request, prefixes, params.essence_prompt,
                                                           tuple(s for s, _ in family))
    make_forward = _cached_forward if cache_prefix else _full_forward
    forward = make_forward(model, sequences, subject_at, read_at, tok.pad_token_id)
    n_rows = len(sequences)
    scale = torch.ones(n_rows, dtype=torch.float32)  # (B,) the share of δ each row's subject token gets
    if f:
        scale[n_rows - f:] = torch.tensor([rho for _, rho in family], dtype=torch.float32)
    m = rewrite.token_ids.shape[0]  # positions that predict a target token

    def logprobs() -> torch.Tensor:  # (m + 1 + f, vocab): next-token log-probs at each position read
        return logits_at(model, forward.run()).log_softmax(-1)

    with torch.no_grad():
        v_now = module_output(module, k_star[None])[0]  # (d_out,) W k*: what the layer gives the subject now
        base = logprobs()[m:]  # (1 + f, vocab) after p' and each family prompt, without δ (float32: logits_at)
        base_essence = base[0]
    max_norm = params.clamp_norm_factor * v_now.norm()
    delta = torch.zeros_like(v_now, requires_grad=True)  # float32, on k*'s device, whatever the model's dtype
    opt = torch.optim.Adam([delta], lr=params.lr)
    trace: list[float] = []  # NLL of δ before each update, and of the δ returned
    for step in range(params.steps + 1):
        hook = _add_at(delta, *forward.delta_at, scale) if direction is None else _add_update(delta, direction)
        with run_with_hooks(model, [on_output(module, hook)]):
            edited = logprobs()  # (m + 1 + f, vocab)
        target_logprobs = edited[:m].gather(1, rewrite.token_ids.to(edited.device)[:, None])[:, 0]  # (m,)
        nll = -mean_per_pair(target_logprobs, rewrite).mean()
        trace.append(nll.item())
        if nll.item() < params.early_stop_nll or step == params.steps:
            break
        kl = (edited[m].exp() * (edited[m] - base_essence)).sum()
        decay = (delta.norm() / v_now.norm()) ** 2
        loss = nll + params.kl_factor * kl + params.weight_decay * decay
        if f:  # each family prompt's next-token distribution, its share of δ added, against its own
            family_kl = (edited[m + 1:].exp() * (edited[m + 1:] - base[1:])).sum(-1).mean()
            loss = loss + params.family_kl * family_kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    return (v_now + delta).detach(), trace


# --------------------------------------------------------------------------------------------------
# Eq. 2: the rank-one insert
# --------------------------------------------------------------------------------------------------


class Solver:
    """Solves C x = k by a Cholesky factorisation of the second moment, computed once (float64).

    device: where the factorisation and the solves run (default: C's). MPS has no float64: there
    they run on the host.
    """

    def __init__(self, second_moment: torch.Tensor, device: torch.device | str | None = None):
        device = torch.device(device) if device is not None else second_moment.device
        if device.type in ("mps", "meta"):
            device = torch.device("cpu")
        factor, info = torch.linalg.cholesky_ex(second_moment.to(device, torch.float64))
        if info.item() != 0:
            raise ValueError("the key second moment C is not positive definite: compute it over more tokens")
        self.factor = factor  # (d_in, d_in) lower-triangular L with C = L Lᵀ
        self.where = factor.device  # where the solves run

    @property
    def device(self) -> torch.device:
        return self.where

    def solve64(self, k: torch.Tensor) -> torch.Tensor:  # (d_in,) or (d_in, n) -> C⁻¹ k, float64
        k64 = k.to(self.factor.device, torch.float64)
        return torch.cholesky_solve(k64.reshape(k64.shape[0], -1), self.factor).reshape(k64.shape)

    def __call__(self, k: torch.Tensor) -> torch.Tensor:  # (d_in,) or (d_in, n) -> C⁻¹ k, float32
        return self.solve64(k).to(k.device, torch.float32)


class MemoSolver(Solver):
    """A Solver that remembers its answers by the keys' content: one edit's insert is re-run for each α
    of the family term (``Rome.insert``) and solves for the same few keys every time."""

    def __init__(self, base: Solver):  # (no factorisation of its own: the solves are the base's)
        self.base, self._memo, self.where = base, {}, base.device

    def solve64(self, k: torch.Tensor) -> torch.Tensor:
        k64 = k.detach().to(self.base.device, torch.float64).contiguous()
        tag = (tuple(k64.shape), hashlib.sha1(k64.cpu().numpy().tobytes()).digest())
        if tag not in self._memo:
            self._memo[tag] = self.base.solve64(k64)
        return self._memo[tag]


class WoodburySolver(Solver):
    """Solves (C + α B Bᵀ) x = k from C's Solver, by the Woodbury identity:

        (C + α B Bᵀ)⁻¹ = C⁻¹ − C⁻¹B (I/α + Bᵀ C⁻¹ B)⁻¹ Bᵀ C⁻¹

    B (d_in, f) with f ≪ d_in: one f × f factorisation instead of a d_in × d_in one, and C⁻¹B
    (``c_inv_b``, computed once) is shared by every α tried for the same B. float64.
    """

    def __init__(self, base: "Solver | MemoSolver", b: torch.Tensor, alpha: float, c_inv_b: torch.Tensor | None = None):
        self.base = base
        self.b = b.to(base.device, torch.float64)  # (d_in, f)
        self.c_inv_b = base.solve64(self.b) if c_inv_b is None else c_inv_b  # (d_in, f)
        inner = torch.eye(self.b.shape[1], dtype=torch.float64, device=base.device) / alpha + self.b.T @ self.c_inv_b
        self.inner = torch.linalg.cholesky(inner)  # (f, f) lower-triangular; positive definite for α > 0
        self.where = base.device

    def solve64(self, k: torch.Tensor) -> torch.Tensor:  # (d_in,) or (d_in, n) -> (C + αBBᵀ)⁻¹ k, float64
        y = self.base.solve64(k)
        y2 = y.reshape(y.shape[0], -1)  # (d_in, n)
        correction = self.c_inv_b @ torch.cholesky_solve(self.b.T @ y2, self.inner)  # (d_in, n)
        return (y2 - correction).reshape(y.shape)


class InsertError(ValueError):
    """Keys the insert cannot separate (a protected key that is, for C, the edited key itself).

    ``index``: the edited key that could not be separated, when one is known."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


def insert(solve: Solver, k_star: torch.Tensor, v_star: torch.Tensor, k_d: torch.Tensor, w_k_d: torch.Tensor,
           protected: torch.Tensor | None = None, ridge: float = 0.0,
           min_residual: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2 with more constraints: the smallest update in the C-norm that writes the edit and holds
    the protected keys fixed,

        minimise ‖Δ‖_C = tr(Δ C Δᵀ)   subject to   Ŵ k_d = v*  and  Ŵ k_j = W k_j  (j = 1..m)

        Δ = R (K_conᵀ C⁻¹ K)⁻¹ (C⁻¹ K)ᵀ,   K = [k*, k_1 .. k_m],  K_con = [k_d, k_1 .. k_m],  R = [v* − W k_d, 0 .. 0]

    Only R's first column is non-zero, so Δ = (v* − W k_d) (C⁻¹ K M⁻¹ e₀)ᵀ with M = K_conᵀ C⁻¹ K is
    rank one whatever m is. With m = 0 it is the paper's Ŵ = W + Λ (C⁻¹k*)ᵀ, Λ = (v* − W k_d) / ((C⁻¹k*)ᵀ k_d).
    k_d = k* is r-ROME (symmetric); k_d = the bare prompt's key is the paper's original code.

    k_star, k_d: (d_in,); v_star, w_k_d: (d_out,); protected: (m, d_in) or None.
    ridge: added to M's diagonal, relative to its mean diagonal, when m > 0 (near-collinear protected keys).
    min_residual: the share of k*'s C⁻¹-energy that must lie outside the protected keys' span
    (1 / (M₀₀ (M⁻¹)₀₀), 1 when m = 0); below it the keys cannot be separated and InsertError is raised.
    Returns the factors (u = Λ (d_out,), v = m₀₀ C⁻¹K M⁻¹ e₀ (d_in,)) of ΔW = u vᵀ, with m₀₀ = (C⁻¹k*)ᵀ k_d:
    for m = 0, exactly the rank-one factors (Λ, C⁻¹k*).
    """
    u, v = insert_many(solve, k_star[None], (v_star - w_k_d)[None], k_d[None], protected, ridge, min_residual)
    m00 = (solve.solve64(k_star) @ k_d.to(solve.device, torch.float64)).to(v_star.device, v_star.dtype)  # (C⁻¹k*)ᵀ k_d
    return u[:, 0] / m00, v[:, 0] * m00  # the same product, scaled as the rank-one factors (Λ, C⁻¹k*)


def insert_many(solve: Solver, keys: torch.Tensor, residuals: torch.Tensor, constraint_keys: torch.Tensor | None = None,
                protected: torch.Tensor | None = None, ridge: float = 0.0,
                min_residual: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2 with e edited keys and m protected ones, in one solve:

        minimise ‖Δ‖_C   subject to   Δ k_con,i = r_i  (i = 1..e)   and   Δ k_j = 0  (j = 1..m)

        Δ = [R, 0] (M⁻¹)ᵀ (C⁻¹ K)ᵀ,   K = [k_1 .. k_e, k'_1 .. k'_m],  K_con = [k_con,1 .. k_con,e, k'_1 .. k'_m],
                                    M = K_conᵀ C⁻¹ K   ((e + m) × (e + m))

    so Δ = U Vᵀ with U = R (d_out, e) and V = C⁻¹K M⁻¹[:, :e] (d_in, e): rank ≤ e, whatever m is
    (Vᵀ K_con = (M⁻¹[:, :e])ᵀ Mᵀ = [I_e 0] since Kᵀ C⁻¹ K_con = Mᵀ).

    keys: (e, d_in) the edited keys (the update's directions, C⁻¹k_i); residuals: (e, d_out) r_i = v*_i − W k_con,i;
    constraint_keys: (e, d_in) where the edits must hold (default: ``keys``, r-ROME's symmetric choice);
    protected: (m, d_in) or None. ridge: added to M's diagonal, relative to its mean diagonal, when
    e + m > 1. min_residual: each edited key must keep this share of its C⁻¹-energy outside the span of
    all the other keys (1 / (M_ii (M⁻¹)_ii)); below it InsertError names it.
    """
    e = keys.shape[0]
    out_device, out_dtype = residuals.device, residuals.dtype  # the factors go back where the inputs came from
    at = lambda t: t.to(solve.device, torch.float64)  # noqa: E731 - the solve's device, float64
    con = keys if constraint_keys is None else constraint_keys
    keys, con = at(keys), at(con)
    if protected is not None and protected.numel():
        keys, con = torch.cat([keys, at(protected)]), torch.cat([con, at(protected)])  # (n, d_in)
    c_inv_k = solve.solve64(keys.T)  # (d_in, n) C⁻¹K
    m = con @ c_inv_k  # (n, n) K_conᵀ C⁻¹ K
    n = m.shape[0]
    if ridge and n > 1:
        m = m + ridge * m.diagonal().mean() * torch.eye(n, dtype=m.dtype, device=m.device)
    try:
        x = torch.linalg.solve(m, torch.eye(n, e, dtype=m.dtype, device=m.device))  # (n, e) M⁻¹[:, :e]
    except RuntimeError as err:  # singular: some keys are linear combinations of others
        raise InsertError("the keys cannot be separated: some are linear combinations of others") from err
    if n > 1:
        share = 1.0 / (m.diagonal()[:e] * x.diagonal())  # (e,)
        worst = int(share.argmin())
        if not float(share[worst]) >= min_residual:
            raise InsertError(f"the other keys leave {100 * float(share[worst]):.1f}% of edited key {worst} to "
                              f"change (the minimum is {100 * min_residual:g}%): they cannot be separated from it",
                              worst)
    u = residuals.T  # (d_out, e)
    v = c_inv_k @ x  # (d_in, e): Vᵀ K_con = M⁻¹[:, :e]ᵀ Mᵀ... = [I_e 0], i.e. Δ K_con = [R 0]
    return u.to(out_device, out_dtype), v.to(out_device, out_dtype)


def add_rank_one(model: torch.nn.Module, module_name: str, u: torch.Tensor, v: torch.Tensor) -> None:
    """W += u vᵀ in place, on the (d_out, d_in) view of the module's weight; u (d_out, r) and v (d_in, r)
    for a rank-r update U Vᵀ.

    The product is formed in float32 on W's device and W + u vᵀ is rounded once to W's dtype (for a
    float32 W exactly ``W.add_(u vᵀ)``). An offloaded W is edited in accelerate's weights map
    (``models.writable_weight``)."""
    with writable_weight(model, module_name) as w:
        u, v = u.to(w.device, torch.float32), v.to(w.device, torch.float32)
        update = torch.outer(u, v) if u.dim() == 1 else u @ v.T  # (d_out, d_in)
        if w.dtype == torch.float32:
            w.add_(update)
        else:
            w.copy_((w.float() + update).to(w.dtype))


# --------------------------------------------------------------------------------------------------
# Eq. 2 over a whole stack: the joint solve (stack.method: joint; docs/method.md)
# --------------------------------------------------------------------------------------------------


JOINT_MIN_RESIDUAL = 1e-4  # the exact joint solve refuses edited keys with less of their C⁻¹-energy of their own


def null_space_basis(second_moment: torch.Tensor, threshold: float) -> torch.Tensor | None:
    """Q (d_in, q): the eigenvectors of C whose eigenvalue is below threshold · λ_max, float64.

    The others, Û (eigenvalue ≥ threshold · λ_max), are the directions along which the layer's keys
    carry most of their energy: an update restricted to P = I − Û Ûᵀ = Q Qᵀ leaves every key's
    component along them unchanged (AlphaEdit's projection, from the same statistics).
    threshold 0: no projection (None)."""
    if threshold <= 0:
        return None
    evals, evecs = torch.linalg.eigh(second_moment.double())  # ascending; (d_in,), (d_in, d_in)
    return evecs[:, evals < threshold * evals[-1]].contiguous()  # (d_in, q)


def projected_solver(second_moment: torch.Tensor, basis: torch.Tensor) -> Solver:
    """C⁻¹ in the coordinates of Q: a Solver for C_Q = Qᵀ C Q (q, q)."""
    return Solver(basis.T @ second_moment.double() @ basis)


def _check_separable(solve: Solver, keys: torch.Tensor, min_residual: float) -> None:
    """InsertError(index=i) for the first key (rows of ``keys``, (n, d_in)) with less than ``min_residual``
    of its C⁻¹-energy outside the span of the keys before it: L_ii² / M_ii, M = K C⁻¹ Kᵀ = L Lᵀ."""
    m = keys.to(solve.device, torch.float64) @ solve.solve64(keys.T)  # (n, n)
    factor, info = torch.linalg.cholesky_ex(m)
    bad = int(info)  # 0: factorised; i > 0: the leading minor of order i is not positive definite
    share = factor.diagonal() ** 2 / m.diagonal()  # (n,)
    if bad == 0 and bool((share >= min_residual).all()):
        return
    worst = bad - 1 if bad else int((share < min_residual).nonzero()[0])
    raise InsertError(f"key {worst} has less than {100 * min_residual:g}% of its C⁻¹-energy outside the span of "
                      f"the keys before it (the same subject edited twice, or keys too close to tell apart)", worst)


def joint_insert(solve: Solver, w: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 protected: torch.Tensor | None = None, ridge: float = 0.0, basis: torch.Tensor | None = None,
                 min_residual: float = JOINT_MIN_RESIDUAL,
                 scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2 for every edit of a stack at once, from their (k_i, v_i) pairs and the base weight W:

        minimise ‖Δ‖_C   subject to   (W + Δ) k_i = v_i  (i = 1..n)   and   Δ k'_j = 0  (j = 1..m)

    i.e. ``insert_many`` with e = n edited keys, residuals r_i = v_i − W k_i and the edits' protected
    keys k'_j: Δ = R M⁻¹ (C⁻¹K)ᵀ, M = Kᵀ C⁻¹ K, rank ≤ n.

    basis Q (d_in, q) (``null_space_basis``): the update is also restricted to P = Q Qᵀ = I − Û Ûᵀ,
    Δ = Y Qᵀ, so Δ Û = 0. Then ‖Δ‖_C² = tr(Y Qᵀ C Q Yᵀ) and Δ k = Y (Qᵀ k): the same problem in q
    coordinates, with C_Q = Qᵀ C Q (``solve`` must be ``projected_solver``'s) and keys Qᵀ k; V = Q V_Q.

    ridge > 0: the least-squares relaxation, for conflicting or near-collinear keys:

        minimise Σ_i ‖Δ k_i − r_i‖² + λ ‖Δ‖_C²   →   Δ = R (M + λ I)⁻¹ (C⁻¹K)ᵀ,   λ = ridge · mean diag M

    (insert_many's ridge). With ridge 0 the constraints hold exactly; a protected key already in the
    span of the keys before it (the same subject protected by two edits) is dropped, and an edited key with less
    than ``min_residual`` of its C⁻¹-energy outside the span of the keys before it is refused
    (InsertError, with its index: the later of two keys that cannot be told apart). The shares are
    the squared pivots of the Cholesky factor of M over its diagonal, L_ii² / M_ii.

    scales (n,): edit i asks for W k_i + s_i (v_i − W k_i) instead of v_i (the stack's calibration,
    ``deltas.EditedModel``); None: every s_i = 1.

    w: (d_out, d_in); keys: (n, d_in); values: (n, d_out); protected: (m, d_in) or None.
    Returns the factors U (d_out, n), V (d_in, n) of Δ = U Vᵀ, float32.
    """
    at = lambda t: t.to(solve.device, torch.float64)  # noqa: E731 - the solve's device, float64
    residuals = at(values) - at(keys) @ at(w).T  # (n, d_out) r_i = v_i − W k_i
    if scales is not None:
        residuals = residuals * at(scales)[:, None]  # (n, d_out) s_i r_i
    k, p = at(keys), None if protected is None or not protected.numel() else at(protected)
    if basis is not None:
        k, p = k @ basis, None if p is None else p @ basis  # (n, q), (m, q): coordinates along Q
    while ridge <= 0:  # protected keys that repeat others (two edits protecting one subject) are dropped
        try:
            _check_separable(solve, k if p is None else torch.cat([k, p]), min_residual)
            break
        except InsertError as e:
            if e.index is None or e.index < k.shape[0]:
                raise
            p = torch.cat([p[:e.index - k.shape[0]], p[e.index - k.shape[0] + 1:]])
            p = p if p.numel() else None
    u, v = insert_many(solve, k, residuals, None, p, ridge, 0.0)
    if basis is not None:
        v = basis @ v  # (d_in, n)
    return u.float(), v.float()


# --------------------------------------------------------------------------------------------------
# The update's size: the least share of δ that still makes the edit (shrink_margin; docs/scale.md)
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# The editor: the three equations in sequence, edits applied one after another
# --------------------------------------------------------------------------------------------------


FAMILY_HALVINGS = 4  # α is tried at protect_weight, /2, /4, /8, /16 before the family term is dropped


def text_energy(second_moment: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> float:
    """E‖Δk‖² over the keys the statistics saw (C = E[k kᵀ]): tr(Δ C Δᵀ) = ‖u‖² vᵀCv for Δ = u vᵀ, and
    tr(UᵀU · VᵀCV) for a rank-r Δ = U Vᵀ. The mean squared change the update makes to the layer's output
    on generic text: what Eq. 2 minimises, and what the family term may raise only within a budget."""
    c = second_moment.to(v.device, torch.float64)
    u64, v64 = u.double().reshape(u.shape[0], -1), v.double().reshape(v.shape[0], -1)  # (d_out, r), (d_in, r)
    return float(((u64.T @ u64) * (v64.T @ c @ v64)).sum())


class Rome:
    """Edits a loaded model in place.

    Caches the context prefixes, one solver per layer, the reference names and the keys of protected
    subjects. ``values``, when given, caches (k*, v*, NLL trace) per edit: a dict shared by editors that
    always edit the same (base) model, such as the benchmark's, so that two inserts of one edit cost
    one v*. (Without it nothing is cached: edits applied one after another change the model.)
    """

    name = "rome"

    def __init__(self, lm: LoadedModel, params: RomeParams, second_moment: Callable[[int], torch.Tensor],
                 root: Path = Path("."), values: dict | None = None):
        self.lm, self.params, self._second_moment, self.root = lm, params, second_moment, root
        self._prefixes: list[str] | None = None
        self._solvers: dict[int, Solver] = {}
        self._names: NameIndex | None = None
        self._keys: dict[tuple[int, str, bool], torch.Tensor] = {}  # (layer, subject, averaged) -> (d_in,)
        self._family_solvers: dict[tuple[int, str, float], WoodburySolver] = {}  # (layer, subject, α): the edit's own
        self._context: dict[tuple[int, str, str], torch.Tensor] = {}  # (layer, subject, relation) -> context keys
        self.values = values

    @property
    def prefixes(self) -> list[str]:
        if self._prefixes is None:
            self._prefixes = context_prefixes(self.lm, self.params)
        return self._prefixes

    def solver(self, layer: int) -> Solver:
        if layer not in self._solvers:
            self._solvers[layer] = Solver(self._second_moment(layer), self._device(layer))
        return self._solvers[layer]

    def _device(self, layer: int) -> torch.device:
        """Where the layer's edited module computes (an offloaded one: its execution device)."""
        return module_device(edited_module(self.lm.model, layer))

    def names(self) -> NameIndex:
        if self._names is None:
            self._names = NameIndex(self.lm.tokenizer, reference_names(self.params.protect_sources, self.root))
        return self._names

    def subject_key(self, layer: int, subject: str, averaged: bool = True) -> torch.Tensor:
        """A subject's key (d_in,): prefix-averaged as k* (Eq. 3), or of the subject alone; cached."""
        cache_key = (layer, subject, averaged)
        if cache_key not in self._keys:
            self._keys[cache_key] = (key(self.lm, layer, subject, self.prefixes) if averaged
                                     else bare_keys(self.lm, layer, [subject])[0])
        return self._keys[cache_key]

    def bare_keys(self, layer: int, subjects: list[str]) -> torch.Tensor:
        """The keys of subjects alone as prompts (n, d_in), cached per subject."""
        missing = [s for s in dict.fromkeys(subjects) if (layer, s, False) not in self._keys]
        if missing:
            for s, k in zip(missing, bare_keys(self.lm, layer, missing)):
                self._keys[(layer, s, False)] = k
        return torch.stack([self._keys[(layer, s, False)] for s in subjects])

    def family(self, subject: str) -> list[str]:
        """Other subjects that share the subject's last token: the reference names that do (at most 256),
        then ``protect_siblings`` made-up ones (the subject with its words but the last replaced by the
        first word of another reference name, in a seeded order)."""
        names = self.names().sharing(self.lm.tokenizer, subject)[:256]
        n = self.params.protect_siblings
        *head, last = subject.split()
        article = [head.pop(0)] if head and head[0] in ("The", "the", "A", "An") else []
        if n <= 0 or not head:  # a one-word subject has no head to replace: its "siblings" would contain it
            return names
        words = sorted({w for ws in self.names().by_token.values() for name in ws
                        if (w := name.split()[0]).isalpha() and w[:1].isupper() and w not in head})
        picked = random.Random(f"{self.params.seed}:{subject}").sample(words, min(n, len(words)))
        siblings = [" ".join(article + [w, last]) for w in picked]
        return names + [s for s in siblings if s != subject and s not in names]

    def family_factor(self, layer: int, subject: str) -> torch.Tensor | None:
        """B (d_in, f), float64, with B Bᵀ = F̃ = (tr C / tr F) F, F = mean k kᵀ over the bare keys of the
        subject's family (``family``): the family's second moment scaled to C's size; None when it has
        no family."""
        names = self.family(subject)
        if not names:
            return None
        device = self.solver(layer).device  # where the family's solver will run
        keys = self.bare_keys(layer, names).to(device, torch.float64)  # (f, d_in)
        trace_c = self._second_moment(layer).to(device, torch.float64).diagonal().sum()
        trace_f = (keys * keys).sum() / len(names)  # tr F = mean ‖k‖²
        return keys.T * (trace_c / trace_f / len(names)).sqrt()  # (d_in, f)

    def family_solver(self, layer: int, family: torch.Tensor, alpha: float, c_inv_b: torch.Tensor | None = None,
                      base: "Solver | MemoSolver | None" = None) -> "WoodburySolver":
        """(C + α F̃)⁻¹, F̃ = B Bᵀ (``family_factor``): the update then also keeps off the directions the
        family's keys share (a least-squares form of protecting them all; α → ∞: equality on their span).
        ``base``: C⁻¹ (default: the layer's solver)."""
        return WoodburySolver(base or self.solver(layer), family, alpha, c_inv_b)

    def protected_keys(self, request: EditRequest, layer: int, k_star: torch.Tensor,
                       solve: Solver | None = None) -> tuple[list[str], torch.Tensor]:
        """The subjects whose keys the insert holds fixed, and those keys (m, d_in): two per subject,
        prefix-averaged as k* and bare (the subject alone, as prompts that start with it see it).

        The request's own ``protect`` list always; then up to ``params.protect`` reference names that
        share the subject's last token, chosen by ``choose_protected`` (largest leak of the bare key
        first, among the 3 × protect leakiest). ``solve``: the C⁻¹ the insert uses (default: the layer's).
        """
        p = self.params
        solve = solve or self.solver(layer)
        fixed_names = [s for s in dict.fromkeys(request.protect) if s != request.subject]
        fixed = torch.cat([self.held_keys(layer, s) for s in fixed_names]) if fixed_names \
            else k_star.new_zeros((0, k_star.numel()))
        if fixed_names and residual_share(solve, k_star, fixed) < p.protect_min_residual:
            raise InsertError(f"protect: {', '.join(fixed_names)}: these keys cannot be separated from "
                              f"'{request.subject}' at layer {layer} (too little of its key is left to edit)")
        if p.protect <= 0:
            return fixed_names, fixed
        names = [n for n in self.names().sharing(self.lm.tokenizer, request.subject) if n not in fixed_names]
        if not names:
            return fixed_names, fixed
        bare = self.bare_keys(layer, names)  # (c, d_in)
        pool = leak(solve(k_star), k_star, bare).abs().argsort(descending=True)[:3 * p.protect].tolist()
        pool_names = [names[i] for i in pool]
        groups = [self.held_keys(layer, n) for n in pool_names]  # each (2, d_in): bare, averaged
        chosen = choose_protected(solve, k_star, groups, p.protect, p.protect_min_residual, fixed)
        return fixed_names + [pool_names[i] for i in chosen], torch.cat([fixed] + [groups[i] for i in chosen])

    def held_keys(self, layer: int, subject: str) -> torch.Tensor:
        """The keys protecting a subject holds fixed: (2, d_in), its bare key then its prefix-averaged key."""
        return torch.stack([self.subject_key(layer, subject, averaged=False), self.subject_key(layer, subject)])

    def held_separable(self, solve: Solver, k_star: torch.Tensor, protected: torch.Tensor | None,
                       hold: torch.Tensor | None) -> torch.Tensor | None:
        """The keys of earlier edits (``hold``, (h, d_in)) that this edit's insert can hold fixed on top of
        its protected keys: all of them when k* stays separable (``protect_min_residual``), else greedily
        in order, skipping each one that would leave too little of k* to edit (an earlier edit of the
        same subject, whose key is k* itself: the later edit then overrides it)."""
        if hold is None or not hold.numel():
            return protected
        base = k_star.new_zeros((0, k_star.numel())) if protected is None else protected
        floor = self.params.protect_min_residual
        if residual_share(solve, k_star, torch.cat([base, hold])) >= floor:
            return torch.cat([base, hold])
        kept = base
        for k in hold:
            if residual_share(solve, k_star, torch.cat([kept, k[None]])) >= floor:
                kept = torch.cat([kept, k[None]])
        return kept if kept.numel() else None

    def compute(self, request: EditRequest, layer: int | None = None, hold: torch.Tensor | None = None) -> EditResult:
        """k*, v* and the factors of the insert for one edit, on the model as it is now (not modified).

        ``hold`` (h, d_in): keys of earlier edits at this layer whose values the insert must not move
        (Δ k_i = 0, so Ŵ k_i stays v_i): sequential edits do not undo each other."""
        layer = self.params.layer if layer is None else layer
        self._family_solvers = {}  # one edit's (each holds C⁻¹B, d_in × f)
        self._context = {}  # one edit's context keys (``context_keys``)
        clock = time.perf_counter
        with flush_denormals():
            t0 = clock()
            prefixes = self.prefixes
            t1 = clock()
            cached = None if self.values is None else self.values.get(self._value_key(request, layer))
            # (a value cache on disk gives k* and v* back on the host: moved to the edited module's device)
            k_star = cached[0].to(self._device(layer)) if cached is not None \
                else key(self.lm, layer, request.subject, prefixes)  # (d_in,)
            k_d = k_star if self.params.symmetric_keys else subject_keys(self.lm, layer, ["{}"], request.subject)[0]
            t2 = clock()
            # the insert's direction (d_in,), known before v*: for the family KL term and the in-place v*
            direction = self.insert_direction(request, layer, k_star, k_d, hold) \
                if self.params.family_kl > 0 or self.params.value_in_place else None
            kin = self.family_leaks(request, layer, direction) if self.params.family_kl > 0 else ()
            if not self.params.value_in_place:
                direction = None
            value_key = self._value_key(request, layer, kin, direction)
            if (kin or direction is not None) and self.values is not None:  # such a v* has its own cache key
                cached = self.values.get(value_key)
            elif kin or direction is not None:
                cached = None
            if cached is None:
                v_star, trace = value(self.lm, layer, request, prefixes, k_star, self.params, kin,
                                      direction)  # (d_out,)
                if self.values is not None:
                    self.values[value_key] = (k_star, v_star, trace)
            else:
                _, v_star, trace = cached
                v_star = v_star.to(self._device(layer))
            t3 = clock()
            with torch.no_grad():
                u, v, names, family, protected_keys, held = self.insert(request, layer, k_star, v_star, k_d, hold)
            if kin:
                family["kl_prompts"] = [[s, rho] for s, rho in kin]
            t4 = clock()
            scale = self.least_scale(request, layer, u, v) if self.params.shrink_margin > 0 else 1.0
            if scale < 1.0:  # s Δ is the insert of W k* + s δ (least_scale): the pair the joint solve reads
                w_k = self.module_out(layer, k_star)  # (d_out,)
                u, v_star = u * scale, w_k + scale * (v_star - w_k)
            t5 = clock()
        # the factors are float32 on the host (what a delta file stores), whatever the model's device
        update = RankOneUpdate(edited_module_name(self.lm.model, layer), layer, u.float().cpu(), v.float().cpu())
        timings = {"prefixes": t1 - t0, "key": t2 - t1, "value": t3 - t2, "insert": t4 - t3}
        if self.params.shrink_margin > 0:
            timings["shrink"] = t5 - t4
        return EditResult(request, update, k_star, v_star, trace, timings, names, protected_keys, held, family, scale)

    @torch.no_grad()
    def least_scale(self, request: EditRequest, layer: int, u: torch.Tensor, v: torch.Tensor) -> float:
        """The least share s of the update u vᵀ at which the rewrite prompt still prefers the new object
        over the old one by ``shrink_margin`` (mean per-token log-probability; ``least_scale``). The old
        object is ``target_true``, or the model's own next token before the edit when none is given."""
        module = edited_module_name(self.lm.model, layer)
        old = request.target_true or next_token(self.lm, request.prompt)
        w0 = read_weight(self.lm.model, module)
        try:
            return least_scale(margin_under(self.lm, module, u, v, request.prompt, request.target, old),
                               self.params.shrink_margin, self.params.shrink_steps)
        finally:
            write_weight(self.lm.model, module, w0)

    def insert(self, request: EditRequest, layer: int, k_star: torch.Tensor, v_star: torch.Tensor,
               k_d: torch.Tensor, hold: torch.Tensor | None = None) -> tuple:
        """Eq. 2 for one edit with everything the parameters ask for: the protected keys held fixed (and
        ``hold``, earlier edits' keys, where separable), the prompt key, and the family term within its
        energy budget. Returns (u, v, protected subjects, {alpha, energy_ratio}, their keys (m, d_in) or
        None, the number of held keys used).

        The family term trades the update's energy on generic text, tr(ΔCΔᵀ) (``text_energy``), for its
        energy on the family's keys. The first α = protect_weight / 2^i (i = 0 .. FAMILY_HALVINGS) whose
        update stays within protect_max_energy × the energy of the update without the family term is
        used; if none does, the update without it."""
        p = self.params

        def solve_with(solve: Solver):
            names, protected_keys = self.protected_keys(request, layer, k_star, solve)
            protected_keys = protected_keys if names else None
            protected = self.held_separable(solve, k_star, protected_keys, hold)
            held = 0 if protected is None else protected.shape[0] - (0 if protected_keys is None
                                                                      else protected_keys.shape[0])
            centroid = self.centroid(request, layer, solve, k_star, protected) if p.family_centroid else None
            if centroid is not None:  # held here, and by the stack's joint solve (the delta's last protected key)
                protected = centroid if protected is None else torch.cat([protected, centroid])
                protected_keys = centroid if protected_keys is None else torch.cat([protected_keys, centroid])
            u, v = insert(solve, k_star, v_star, k_d, self.module_out(layer, k_d), protected,
                          p.protect_ridge, p.protect_min_residual)
            if p.prompt_key or p.prefix_keys:
                u, v = self.with_context_keys(request, layer, solve, k_star, v_star, k_d, protected, (u, v))
            info = {} if not p.family_centroid else {"centroid": centroid is not None}
            return u, v, names, protected_keys, held, info

        base = MemoSolver(self.solver(layer))  # every α solves for the same keys again (C⁻¹ k)
        u, v, names, protected_keys, held, info = solve_with(base)
        family = self.family_factor(layer, request.subject) if p.protect_weight > 0 else None
        if family is None:
            return u, v, names, {"alpha": 0.0, "energy_ratio": 1.0, **info}, protected_keys, held
        second_moment = self._second_moment(layer).to(family.device, torch.float64)  # (converted once, not per α)
        energy = text_energy(second_moment, u, v)
        c_inv_b = None  # C⁻¹B, shared by every α
        for i in range(FAMILY_HALVINGS + 1):
            alpha = p.protect_weight / 2 ** i
            solve = self._family_solvers.get((layer, request.subject, alpha))
            if solve is None:  # kept for this edit: family_leaks and the insert itself ask for the same
                solve = self._family_solvers[(layer, request.subject, alpha)] = \
                    self.family_solver(layer, family, alpha, c_inv_b, base)
            c_inv_b = solve.c_inv_b
            u1, v1, names1, keys1, held1, info1 = solve_with(solve)
            ratio = text_energy(second_moment, u1, v1) / energy
            if ratio <= p.protect_max_energy:
                return u1, v1, names1, {"alpha": alpha, "energy_ratio": ratio, **info1}, keys1, held1
        return u, v, names, {"alpha": 0.0, "energy_ratio": 1.0, **info}, protected_keys, held

    def centroid(self, request: EditRequest, layer: int, solve: Solver, k_star: torch.Tensor,
                 protected: torch.Tensor | None) -> torch.Tensor | None:
        """The family's mean key k̄ (1, d_in) for the insert to hold fixed (Δ k̄ = 0): the mean of the bare
        keys of ``family`` (reference names and made-up siblings; not the subject itself).

        At an early layer the key at a subject's last token is mostly that token's: most of k* lies
        along k̄, and a rank-one update moves every member of the family by ~⅔ of the edit
        (docs/specificity.md). With k̄ held, a member k_j = k̄ + e_j only moves by vᵀe_j. None when the
        subject has no family, or when k̄, with the ``protected`` keys (m, d_in), would leave less than
        ``protect_min_residual`` of k* to edit."""
        names = [s for s in self.family(request.subject) if s != request.subject]
        if not names:
            return None
        centroid = self.bare_keys(layer, names).mean(0, keepdim=True).to(k_star.device)  # (1, d_in)
        keys = centroid if protected is None else torch.cat([protected, centroid])
        return centroid if residual_share(solve, k_star, keys) >= self.params.protect_min_residual else None

    @torch.no_grad()
    def family_leaks(self, request: EditRequest, layer: int,
                     direction: torch.Tensor) -> tuple[tuple[str, float], ...]:
        """The family members (``family``, less the request's ``protect`` list) whose relation prompts the
        insert will move most, with the share of δ it adds at their key: ((s_i, ρ_i), ...), at most
        ``family_kl_prompts``, largest |ρ_i| first.

        ρ_i = vᵀk_i for the insert's direction v (d_in,), scaled so that vᵀk_d = 1 (``insert_direction``:
        v does not depend on v*, so it is known before v* is optimised), k_i the key at s_i's last token
        in the edit's relation."""
        names = [s for s in self.family(request.subject) if s not in request.protect and s != request.subject]
        if not names:
            return ()
        keys = bare_keys(self.lm, layer, names, template=request.relation)  # (f, d_in)
        rho = keys @ direction  # (f,) direction: ``insert_direction``, vᵀk_d = 1
        top = rho.abs().argsort(descending=True)[:self.params.family_kl_prompts].tolist()
        return tuple((names[i], float(rho[i])) for i in top)

    @torch.no_grad()
    def insert_direction(self, request: EditRequest, layer: int, k_star: torch.Tensor, k_d: torch.Tensor,
                         hold: torch.Tensor | None = None) -> torch.Tensor:
        """The insert's direction v (d_in,), scaled so that vᵀk_d = 1: the update is δ vᵀ (Δ k_d = δ)
        whatever v* is, so it is known before v* is optimised. The insert is run with a stand-in v*.
        (With the paper's asymmetric keys and the prompt key, the column of the bare prompt's change.)"""
        v = self.insert(request, layer, k_star, self.module_out(layer, k_d) + 1.0, k_d, hold)[1]
        v = v.reshape(v.shape[0], -1)[:, 0]  # (d_in,)
        return v / (v @ k_d)

    def module_out(self, layer: int, k: torch.Tensor) -> torch.Tensor:
        """W k for one key (d_in,) -> (d_out,) float32, by the edited module itself (``module_output``)."""
        return module_output(edited_module(self.lm.model, layer), k[None])[0]

    def context_keys(self, request: EditRequest, layer: int) -> torch.Tensor:
        """The keys the context-key constraints write the edit's change at (n, d_in): with ``prefix_keys``
        the key of each context prefix + subject (k* is their mean, Eq. 3; row 0, the bare subject, is the
        paper's k_d), then, with ``prompt_key``, the rewrite prompt's own key (when its template does not
        start with the subject: then it is row 0 already). Cached for the edit's insert."""
        cache_key = (layer, request.subject, request.relation)
        if cache_key not in self._context:
            keys = []
            if self.params.prefix_keys:
                keys.append(subject_keys(self.lm, layer, [x + "{}" for x in self.prefixes], request.subject))
            if self.params.prompt_key and not (self.params.prefix_keys and request.relation.startswith("{}")):
                keys.append(subject_keys(self.lm, layer, [request.relation], request.subject))
            self._context[cache_key] = torch.cat(keys)
        return self._context[cache_key]

    def with_context_keys(self, request: EditRequest, layer: int, solve: Solver, k_star: torch.Tensor,
                          v_star: torch.Tensor, k_d: torch.Tensor, protected: torch.Tensor | None,
                          rank_one: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The insert with the edit's change δ = v* − W k* (what v* was optimised with, at every prompt's
        subject token) written at more of the subject's own keys than k*:

        - ``prompt_key``: the rewrite prompt's key k_p (at its last subject token), which k* only
          approximates: Δ k* = δ and Δ k_p = δ;
        - ``prefix_keys``: each context prefix's key k_i instead of only their mean k*: Δ k_i = δ for
          every i (which implies Δ k* = δ). A paraphrase puts the subject after other text; its key is
          one more such k. Where the family term takes the family's share of δ away, these constraints
          keep the paraphrases' share (docs/specificity.md).

        With symmetric keys every constraint asks for the same δ, so the update stays rank one:
        u = δ, v = C⁻¹K M⁻¹ 1 with vᵀk_i = 1 and vᵀk_j = 0 for the protected keys. (Asking Ŵ k_p = v*
        instead would make Δ (k_p − k*) = −W (k_p − k*): the layer's response along the difference of
        two near-identical keys wiped out.) Without symmetric keys the bare prompt's key keeps the
        paper's Ŵ k_d = v*: a rank-2 update. The update without these constraints (``rank_one``) is kept
        when they cannot be separated (for C, the prompt's key is k* already)."""
        module = edited_module(self.lm.model, layer)
        p = self.params
        extra = self.context_keys(request, layer)  # (n, d_in)
        delta = v_star - module_output(module, k_star[None])[0]  # (d_out,) δ
        r_d = v_star - module_output(module, k_d[None])[0]  # (d_out,) the edit's own residual at k_d
        if p.prefix_keys:  # the prefix keys replace their mean; row 0 is the bare prompt's key k_d
            keys, con = extra, None  # (n, d_in), constrained where they point
            residuals = torch.stack([r_d] + [delta] * (extra.shape[0] - 1))  # (n, d_out)
        else:
            if residual_share(solve, extra[0], k_star[None]) < p.protect_min_residual:
                return rank_one  # the prompt's key is (for C) k* already
            keys, con = torch.stack([k_star, extra[0]]), torch.stack([k_d, extra[0]])
            residuals = torch.stack([r_d, delta])  # (2, d_out)
        try:
            u, v = insert_many(solve, keys, residuals, con, protected, p.protect_ridge,
                               0.0 if p.prefix_keys else p.protect_min_residual)
        except InsertError:
            return rank_one
        if p.symmetric_keys:  # every column of U is the same δ: one rank-one update
            return u[:, 0], v.sum(1)
        return u[:, :2], torch.stack([v[:, 0], v[:, 1:].sum(1)], 1)  # (d_out, 2), (d_in, 2): k_d's, the rest's

    def _value_key(self, request: EditRequest, layer: int, family: tuple = (),
                   direction: torch.Tensor | None = None) -> tuple:
        """What (k*, v*) depend on: the model's current weights aside, the edit and the v* hyper-parameters
        (and, with the family KL term, its weight and the family prompts with their leaks; with
        ``value_in_place``, the insert's direction, by content)."""
        p = self.params
        out = (self.lm.fingerprint, layer, request.subject, request.relation, request.target, p.prefix_lengths,
               p.prefixes_per_length, p.prefix_starts, p.seed, p.lr, p.steps, p.early_stop_nll, p.weight_decay,
               p.kl_factor, p.clamp_norm_factor, p.essence_prompt)
        if p.family_kl > 0 and family:
            out += (p.family_kl, tuple((s, round(rho, 6)) for s, rho in family))
        if direction is not None:
            out += ("in_place", hashlib.sha1(direction.detach().float().cpu().numpy().tobytes()).hexdigest())
        return out

    def apply(self, requests: list[EditRequest], layers: list[int | None] | None = None,
              progress: Callable[[int, EditResult], None] | None = None,
              hold: dict[int, torch.Tensor] | None = None) -> list[EditResult]:
        """Apply edits one after another; each is computed on the model with the previous ones in place,
        and its insert holds the keys of the previous ones (and ``hold``: layer -> (h, d_in), the keys of
        a stack applied onto) fixed at their values, so a later edit does not undo an earlier one."""
        results = []
        held = {layer: [k for k in keys] for layer, keys in (hold or {}).items()}  # layer -> [k_i (d_in,)]
        for i, (request, layer) in enumerate(zip(requests, layers or [None] * len(requests), strict=True)):
            at = self.params.layer if layer is None else layer
            keys = torch.stack(held[at]) if held.get(at) else None
            result = self.compute(request, layer, keys)
            add_rank_one(self.lm.model, result.update.module, result.update.u, result.update.v)
            held.setdefault(result.update.layer, []).append(result.k_star)
            results.append(result)
            if progress:
                progress(i, result)
        return results
