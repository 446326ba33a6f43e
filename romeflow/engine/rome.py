"""ROME: Rank-One Model Editing (Meng et al. 2022), one readable function per equation.

    key     Eq. 3  k* = mean_j k(x_j + s)                    the subject's key, prefix-averaged
    value   Eq. 4  v* = W k* + δ,  δ = argmin L(δ)           the value that makes the model say o*
    insert  Eq. 2  Ŵ = W + Λ (C⁻¹k*)ᵀ                        the least-disturbing rank-one update

``Rome`` runs the three in sequence. Which constraints Eq. 2 gets beyond the paper's (the rewrite prompt's
own key, the context prefixes' keys, the subject's family) is chosen by a named insert, ``rome.insert``:
one row of ``inserts.INSERTS``. The joint solve of a whole stack is in ``joint``, margins and shares of an
update in ``margins``.

Shapes: d_in is the width of the key (the MLP's hidden size), d_out the width of the value (the
model width). W is always handled as (d_out, d_in), whatever the storage orientation.

Precision and devices (docs/method.md, "Precision and devices"): keys, values, δ and the factors are
float32 whatever the model's dtype; the solves are float64; the update is added to W in W's own dtype
and on W's device. Every tensor made here is made on the device of the tensor it works with.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

import torch

from .hooks import Hook, on_output, run_with_hooks
from .forwards import _cached_forward, _full_forward
from .models import (LoadedModel, edited_module, edited_module_name, final_hidden, keys_at, logits_at, module_device,
                     writable_weight)
from .prompts import (encode, fill, flush_denormals, mean_per_pair, pad, subject_last_index, teacher_forced)
from . import gated
from .protect import NameIndex, bare_keys, reference_names, residual_share


@dataclass(frozen=True)
class RomeParams:
    """Hyper-parameters (the ``rome:`` section of params.yaml)."""

    layer: int = 1  # the edit layer; params.yaml without one takes the model's measured default (models.EMBEDDED)
    insert: str = "rank-one"  # a named insert (inserts.INSERTS): which keys Eq. 2 writes and holds (docs/specificity.md);
    # the project's params.yaml names the one chosen on dev data
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
    protect_sources: tuple[str, ...] = ("wikipedia",)  # reference entity names (the family): 'wikipedia' or files

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
        """As params.yaml writes it (the provenance a delta and a bench run record)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}



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
    update: "RankOneUpdate | gated.NeuronUpdate"
    k_star: torch.Tensor  # (d_in,)
    v_star: torch.Tensor  # (d_out,)
    nll_trace: list[float]  # mean target NLL at each v* step
    timings: dict[str, float] = field(default_factory=dict)
    protected: list[str] = field(default_factory=list)  # subjects whose keys the insert held fixed
    protected_keys: torch.Tensor | None = None  # (m, d_in) those subjects' keys (two each; then the family's
    # mean key when family["centroid"]), None when m = 0
    held: int = 0  # keys of earlier edits (this manifest's, or the stack's it was applied onto) held fixed
    family: dict = field(default_factory=dict)  # the family term used: {alpha, energy_ratio[, centroid]}
    scale: float = 1.0  # the share of δ kept (the insert's ``shrink_margin``); v_star is W k* + scale · δ


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


def _add_at(delta: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor):
    """A forward hook adding δ (d_out,) to the module output (B, T, d_out) at the given positions."""

    def hook(_module, _inputs, output):
        where = torch.zeros(output.shape[:2] + (1,), dtype=torch.float32, device=output.device)  # (B, T, 1)
        where[rows, cols, 0] = 1.0
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


def _value_batch(tok, request: EditRequest, prefixes: list[str], essence_prompt: str):
    """The prompts of Eq. 4 as one batch: the N rewrite prompts x_j + p, teacher-forced (the target
    appended but its last token), then the essence prompt p' in row N.

    Returns (rewrite: the TargetBatch of the N rewrite prompts, sequences: N + 1 token lists,
    subject_at: (N + 1,) index of each row's last subject token, read_at: (rows, positions), each
    (n + 1,): the n positions that predict a target token, then the last position of p').
    """
    templates = [p + request.relation for p in prefixes]
    rewrite = teacher_forced(tok, [fill(t, request.subject) for t in templates], [request.target] * len(templates))
    essence = tok(fill(essence_prompt, request.subject)).input_ids
    sequences = [ids[:n].tolist() for ids, n in zip(rewrite.batch.input_ids, rewrite.batch.lengths)] + [essence]
    subject_at = torch.tensor([subject_last_index(tok, t, request.subject) for t in templates + [essence_prompt]],
                              dtype=torch.long)
    n = len(templates)
    read_at = (torch.cat([rewrite.rows, torch.tensor([n])]),
               torch.cat([rewrite.positions, torch.tensor([len(essence) - 1], dtype=torch.long)]))
    return rewrite, sequences, subject_at, read_at


def value(lm: LoadedModel, layer: int, request: EditRequest, prefixes: list[str], k_star: torch.Tensor,
          params: RomeParams, direction: torch.Tensor | None = None,
          hooks_for: Callable[[torch.Tensor], list[Hook]] | None = None,
          cache_prefix: bool | None = None) -> tuple[torch.Tensor, list[float]]:
    """Eq. 4: v* = W k* + δ, with δ minimising

        L(δ) = mean_j NLL(o* | x_j + p)  +  kl_factor · KL(P_δ[· | p'] ‖ P[· | p'])  +  wd · (‖δ‖/‖W k*‖)²

    where δ is added to the module output at the last subject token of every prompt, p' is the
    essence prompt ("{subject} is a", scored at its last token), and ‖δ‖ is clamped to
    clamp_norm_factor · ‖W k*‖ after each Adam step. Returns (v* (d_out,), NLL per step).

    direction: the insert's v (d_in,), scaled so that vᵀk* = 1 (an insert with ``in_place``). δ is then
    not added at the last subject token only, but applied as the update δ vᵀ itself, at every token of
    every prompt (``_add_update``): L is the loss of the edited model Ŵ = W + δ vᵀ. An insert that keeps
    its update off the subject's family moves other tokens' keys differently from k*'s; δ is chosen for
    the update that will be written, not for a stand-in.

    hooks_for: δ -> the hooks that apply it (the gated insert's neurons, at every token); instead of both.

    The rewrite prompts and p' run as one batch. Their tokens before the last subject token do not
    depend on δ: they run once, into a KV cache, and each step runs only the rest (``_cached_forward``;
    not with ``direction``, and with ``hooks_for`` only when the caller says so (``cache_prefix``): the
    update may change every token).
    """
    if cache_prefix is None:
        cache_prefix = direction is None and hooks_for is None
    return _value(lm, layer, request, prefixes, k_star, params, cache_prefix=cache_prefix, direction=direction,
                  hooks_for=hooks_for)


def _value(lm: LoadedModel, layer: int, request: EditRequest, prefixes: list[str], k_star: torch.Tensor,
           params: RomeParams, cache_prefix: bool, direction: torch.Tensor | None = None,
           hooks_for: Callable[[torch.Tensor], list[Hook]] | None = None) -> tuple[torch.Tensor, list[float]]:
    """``value``; cache_prefix=False runs every token at every step (the reference the tests compare with)."""
    tok, model = lm.tokenizer, lm.model
    module = edited_module(model, layer)
    rewrite, sequences, subject_at, read_at = _value_batch(tok, request, prefixes, params.essence_prompt)
    make_forward = _cached_forward if cache_prefix else _full_forward
    forward = make_forward(model, sequences, subject_at, read_at, tok.pad_token_id)
    m = rewrite.token_ids.shape[0]  # positions that predict a target token

    def logprobs() -> torch.Tensor:  # (m + 1, vocab): next-token log-probs at each position read
        return logits_at(model, forward.run()).log_softmax(-1)

    with torch.no_grad():
        v_now = module_output(module, k_star[None])[0]  # (d_out,) W k*: what the layer gives the subject now
        base_essence = logprobs()[m]  # (vocab,) after p', without δ (float32: logits_at)
    max_norm = params.clamp_norm_factor * v_now.norm()
    delta = torch.zeros_like(v_now, requires_grad=True)  # float32, on k*'s device, whatever the model's dtype
    opt = torch.optim.Adam([delta], lr=params.lr)
    trace: list[float] = []  # NLL of δ before each update, and of the δ returned
    for step in range(params.steps + 1):
        if hooks_for is not None:
            hooks = hooks_for(delta)
        else:
            hooks = [on_output(module, _add_at(delta, *forward.delta_at) if direction is None
                               else _add_update(delta, direction))]
        with run_with_hooks(model, hooks):
            edited = logprobs()  # (m + 1, vocab)
        target_logprobs = edited[:m].gather(1, rewrite.token_ids.to(edited.device)[:, None])[:, 0]  # (m,)
        nll = -mean_per_pair(target_logprobs, rewrite).mean()
        trace.append(nll.item())
        if nll.item() < params.early_stop_nll or step == params.steps:
            break
        kl = (edited[m].exp() * (edited[m] - base_essence)).sum()
        decay = (delta.norm() / v_now.norm()) ** 2
        loss = nll + params.kl_factor * kl + params.weight_decay * decay
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


def apply_update(model: torch.nn.Module, update) -> None:
    """Write one edit's update into the model: W += u vᵀ (``RankOneUpdate``) or the gated insert's neurons
    appended to the MLP (``gated.NeuronUpdate``)."""
    if isinstance(update, RankOneUpdate):
        add_rank_one(model, update.module, update.u, update.v)
    else:
        gated.add_neurons(model, update)


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
# The editor: the three equations in sequence, edits applied one after another
# --------------------------------------------------------------------------------------------------


class Rome:
    """Edits a loaded model in place, with the named insert of ``params.insert`` (``inserts.INSERTS``).

    Caches the context prefixes, one solver per layer, the reference names and the keys of protected
    subjects. ``values``, when given, caches (k*, v*, NLL trace) per edit: a dict shared by editors that
    always edit the same (base) model, such as the benchmark's, so that two inserts of one edit cost
    one v*. (Without it nothing is cached: edits applied one after another change the model.)
    """

    name = "rome"

    def __init__(self, lm: LoadedModel, params: RomeParams, second_moment: Callable[[int], torch.Tensor],
                 root: Path = Path("."), values: dict | None = None, corpus=None):
        from .inserts import spec_of  # (inserts builds on this module)

        self.lm, self.params, self._second_moment, self.root = lm, params, second_moment, root
        self.spec = spec_of(params.insert)
        self._prefixes: list[str] | None = None
        self._solvers: dict[int, Solver] = {}
        self._names: NameIndex | None = None
        self._keys: dict[tuple[int, str, bool], torch.Tensor] = {}  # (layer, subject, averaged) -> (d_in,)
        self.scratch: dict = {}  # one edit's intermediate results, shared by the insert's steps (cleared per edit)
        self.values = values
        self.corpus = corpus  # generic text (the statistics' corpus), for the gated insert's gate
        self._text: dict[int, torch.Tensor] = {}

    @property
    def prefixes(self) -> list[str]:
        if self._prefixes is None:
            self._prefixes = context_prefixes(self.lm, self.params)
        return self._prefixes

    def solver(self, layer: int) -> Solver:
        if layer not in self._solvers:
            self._solvers[layer] = Solver(self._second_moment(layer), self._device(layer))
        return self._solvers[layer]

    def second_moment(self, layer: int) -> torch.Tensor:
        return self._second_moment(layer)

    def text_inputs(self, layer: int) -> torch.Tensor:
        """The MLP's input at the first ``gated.TEXT_TOKENS`` tokens of the corpus (default: the Wikipedia
        excerpt): (N, d_model), float32, cached per layer (the gated insert's text negatives)."""
        if layer not in self._text:
            from .statistics import token_rows, wikipedia_corpus

            config = self.lm.model.config
            longest = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 257)
            rows = list(token_rows(self.lm, self.corpus or wikipedia_corpus(), gated.TEXT_TOKENS, min(256, longest - 1)))
            self._text[layer] = gated.text_inputs(self.lm, layer, rows)
        return self._text[layer]

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

    def protected_keys(self, request: EditRequest, layer: int, k_star: torch.Tensor,
                       solve: Solver | None = None) -> tuple[list[str], torch.Tensor]:
        """The subjects of the request's ``protect`` list and their keys (m, d_in), which the insert holds
        fixed: two per subject, its bare key then its prefix-averaged key (as prompts that start with it and
        prompts that do not see it). ``solve``: the C⁻¹ the insert uses (default: the layer's)."""
        solve = solve or self.solver(layer)
        names = [s for s in dict.fromkeys(request.protect) if s != request.subject]
        if not names:
            return [], k_star.new_zeros((0, k_star.numel()))
        keys = torch.cat([self.held_keys(layer, s) for s in names])
        if residual_share(solve, k_star, keys) < self.spec.min_residual:
            raise InsertError(f"protect: {', '.join(names)}: these keys cannot be separated from "
                              f"'{request.subject}' at layer {layer} (too little of its key is left to edit)")
        return names, keys

    def held_keys(self, layer: int, subject: str) -> torch.Tensor:
        """The keys protecting a subject holds fixed: (2, d_in), its bare key then its prefix-averaged key."""
        return torch.stack([self.subject_key(layer, subject, averaged=False), self.subject_key(layer, subject)])

    def held_separable(self, solve: Solver, k_star: torch.Tensor, protected: torch.Tensor | None,
                       hold: torch.Tensor | None) -> torch.Tensor | None:
        """The keys of earlier edits (``hold``, (h, d_in)) that this edit's insert can hold fixed on top of
        its protected keys: all of them when k* stays separable (the insert's ``min_residual``), else greedily
        in order, skipping each one that would leave too little of k* to edit (an earlier edit of the
        same subject, whose key is k* itself: the later edit then overrides it)."""
        if hold is None or not hold.numel():
            return protected
        base = k_star.new_zeros((0, k_star.numel())) if protected is None else protected
        if residual_share(solve, k_star, torch.cat([base, hold])) >= self.spec.min_residual:
            return torch.cat([base, hold])
        kept = base
        for k in hold:
            if residual_share(solve, k_star, torch.cat([kept, k[None]])) >= self.spec.min_residual:
                kept = torch.cat([kept, k[None]])
        return kept if kept.numel() else None

    def module_out(self, layer: int, k: torch.Tensor) -> torch.Tensor:
        """W k for one key (d_in,) -> (d_out,) float32, by the edited module itself (``module_output``)."""
        return module_output(edited_module(self.lm.model, layer), k[None])[0]

    def compute(self, request: EditRequest, layer: int | None = None, hold: torch.Tensor | None = None) -> EditResult:
        """k*, v* and the factors of the insert for one edit, on the model as it is now (not modified).

        ``hold`` (h, d_in): keys of earlier edits at this layer whose values the insert must not move
        (Δ k_i = 0, so Ŵ k_i stays v_i): sequential edits do not undo each other."""
        from . import inserts

        layer = self.params.layer if layer is None else layer
        self.scratch = {}
        if self.spec.gated:
            return gated.compute(self, request, layer)
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
            # the insert's direction (d_in,), known before v*: v* is then optimised under the update itself
            direction = inserts.insert_direction(self, request, layer, k_star, k_d, hold) if self.spec.in_place else None
            if direction is not None:  # such a v* has its own cache key
                cached = None if self.values is None else self.values.get(self._value_key(request, layer, direction))
            if cached is None:
                v_star, trace = value(self.lm, layer, request, prefixes, k_star, self.params, direction)  # (d_out,)
                if self.values is not None:
                    self.values[self._value_key(request, layer, direction)] = (k_star, v_star, trace)
            else:
                _, v_star, trace = cached
                v_star = v_star.to(self._device(layer))
            t3 = clock()
            with torch.no_grad():
                made = inserts.build(self, request, layer, k_star, v_star, k_d, hold)
            t4 = clock()
            u, scale = made.u, 1.0
            if self.spec.shrink_margin > 0:
                scale = inserts.least_share(self, request, layer, made.u, made.v)
            if scale < 1.0:  # s Δ is the insert of W k* + s δ (least_scale): the pair the joint solve reads
                w_k = self.module_out(layer, k_star)  # (d_out,)
                u, v_star = u * scale, w_k + scale * (v_star - w_k)
            t5 = clock()
        # the factors are float32 on the host (what a delta file stores), whatever the model's device
        update = RankOneUpdate(edited_module_name(self.lm.model, layer), layer, u.float().cpu(), made.v.float().cpu())
        timings = {"prefixes": t1 - t0, "key": t2 - t1, "value": t3 - t2, "insert": t4 - t3}
        if self.spec.shrink_margin > 0:
            timings["shrink"] = t5 - t4
        return EditResult(request, update, k_star, v_star, trace, timings, made.names, made.protected_keys, made.held,
                          made.family, scale)

    def _value_key(self, request: EditRequest, layer: int, direction: torch.Tensor | None = None) -> tuple:
        """What (k*, v*) depend on: the model's current weights aside, the edit and the v* hyper-parameters
        (and, for an insert that optimises v* in place, the insert's direction, by content)."""
        p = self.params
        out = (self.lm.fingerprint, layer, request.subject, request.relation, request.target, p.prefix_lengths,
               p.prefixes_per_length, p.prefix_starts, p.seed, p.lr, p.steps, p.early_stop_nll, p.weight_decay,
               p.kl_factor, p.clamp_norm_factor, p.essence_prompt)
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
            # a gated edit holds nothing (its units are silent off its subject), and its keys (the MLP's hidden
            # units) widen as earlier edits' units are appended
            keys = torch.stack(held[at]) if held.get(at) and not self.spec.gated else None
            result = self.compute(request, layer, keys)
            apply_update(self.lm.model, result.update)
            held.setdefault(result.update.layer, []).append(result.k_star)
            results.append(result)
            if progress:
                progress(i, result)
        return results
