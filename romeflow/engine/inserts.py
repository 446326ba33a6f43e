"""The named inserts: which keys Eq. 2 writes the edit's change at and which it holds fixed.

Every insert here is linear in the key: Δ = δ vᵀ (rank one with symmetric keys), so a key k receives vᵀk
times the edit's change δ = v* − W k*. They differ in v (docs/specificity.md has each one's measured row):

    rank-one   the paper's Eq. 2: Δ k* = δ, the manifest's ``protect:`` keys held (Δ k_j = 0)
    family     + the rewrite prompt's own key (Δ k_p = δ), and kept off the directions the subject's family
               shares (C + αF̃ instead of C) as far as an energy budget on generic text allows
    entity     + every context prefix's key (Δ k_i = δ), the family's mean key held fixed, v* optimised
               under the update itself, and δ shrunk to the least share that keeps a 7-nat margin

and one that is not linear (engine/gated.py):

    gated      two neurons added to the MLP whose output is δ times a gate, exactly 0 below a threshold

A new insert is one row of ``INSERTS``. The editor (``rome.Rome``) calls ``build`` for the factors and,
when the insert asks for them, ``insert_direction`` (before v*) and ``least_share`` (after).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import torch

from .margins import least_scale, margin_under, next_token
from .models import edited_module, edited_module_name, read_weight, write_weight
from .rome import EditRequest, InsertError, Rome, Solver, insert, insert_many, module_output, subject_keys
from .protect import residual_share

FAMILY_HALVINGS = 4  # α is tried at family_weight, /2, /4, /8, /16 before the family term is dropped
PROTECT_RIDGE = 1e-6  # ridge on Kᵀ C⁻¹ K when keys are held fixed, relative to its mean diagonal
MIN_RESIDUAL = 0.05  # refuse held keys that leave less than this share of k*'s C⁻¹-energy to edit


@dataclass(frozen=True)
class InsertSpec:
    """One named insert: the constraints Eq. 2 gets and how δ is chosen."""

    prompt_key: bool = False  # Δ k_p = δ at the rewrite prompt's own key too (still rank one)
    prefix_keys: bool = False  # Δ k_i = δ at each context prefix's key, not only at their mean k*
    family_weight: float = 0.0  # α: C + α·(tr C / tr F)·F, F the second moment of the subject's family (0: off)
    max_energy: float = 2.0  # ... while tr(ΔCΔᵀ) ≤ this × the update's without the family term (α halved until)
    siblings: int = 0  # made-up family members: other reference names' first words + the subject's last word
    centroid: bool = False  # hold the family's mean key fixed (one more protected key, kept by the joint stack)
    in_place: bool = False  # v*: δ optimised with the update δ vᵀ applied at every token
    shrink_margin: float = 0.0  # keep the least share of δ at which the prompt prefers o* by this margin (0: off)
    shrink_steps: int = 5  # bisection steps for that share (resolution 2⁻ⁿ)
    gated: bool = False  # not linear: two neurons added to the MLP, silent below a threshold (engine/gated.py)
    gate_low: float = 0.3  # τ₀: the gate opens at this score (the rewrite prompt scores 1; exactly closed below τ₀ − 0.25),
    # raised per edit until the family members it knows are exactly closed (gated.closing_low)
    gate_high: float = 0.5  # τ₁: ... and is fully open from this one
    gate_l2: float = 1e-2  # the gate's logistic regression: L2 weight
    ridge: float = PROTECT_RIDGE  # on Kᵀ C⁻¹ K when keys are held fixed, relative to its mean diagonal
    min_residual: float = MIN_RESIDUAL  # refuse held keys that leave less than this share of k* to edit
    doc: str = field(default="", compare=False)


INSERTS: dict[str, InsertSpec] = {
    "rank-one": InsertSpec(doc="Eq. 2 as in the paper (r-ROME's symmetric keys)"),
    "family": InsertSpec(prompt_key=True, family_weight=0.3, max_energy=2.0, siblings=64,
                         doc="rank one at k* and the prompt's key, off the family's directions within 2x energy"),
    "entity": InsertSpec(prompt_key=True, prefix_keys=True, siblings=64, centroid=True, in_place=True,
                         shrink_margin=7.0,
                         doc="every prefix's key, the family's mean key held, v* in place, shrunk to a 7-nat margin"),
    "gated": InsertSpec(gated=True, siblings=64,
                        doc="two neurons in the MLP, gated by a logistic score of its input; exactly 0 below a threshold"),
}


def spec_of(name: str) -> InsertSpec:
    if name not in INSERTS:
        raise ValueError(f"unknown insert '{name}' (known: {', '.join(INSERTS)})")
    return INSERTS[name]


@dataclass
class Insertion:
    """What ``build`` returns: the factors of Δ = u vᵀ and what the insert held fixed."""

    u: torch.Tensor  # (d_out,) or (d_out, r)
    v: torch.Tensor  # (d_in,) or (d_in, r)
    names: list[str]  # subjects whose keys were held fixed (the manifest's protect: list)
    protected_keys: torch.Tensor | None  # (m, d_in): theirs (two each), then the family's mean key
    held: int  # keys of earlier edits held fixed
    family: dict  # {alpha, energy_ratio[, centroid]}


# --------------------------------------------------------------------------------------------------
# The family: other subjects that share the edited subject's last token
# --------------------------------------------------------------------------------------------------


def family(rome: Rome, subject: str) -> list[str]:
    """Other subjects that share the subject's last token: the reference names that do (at most 256),
    then the insert's ``siblings`` made-up ones (the subject with its words but the last replaced by the
    first word of another reference name, in a seeded order; none for a one-word subject)."""
    names = rome.names().sharing(rome.lm.tokenizer, subject)[:256]
    n = rome.spec.siblings
    *head, last = subject.split()
    article = [head.pop(0)] if head and head[0] in ("The", "the", "A", "An") else []
    if n <= 0 or not head:  # a one-word subject has no head to replace: its "siblings" would contain it
        return names
    words = sorted({w for ws in rome.names().by_token.values() for name in ws
                    if (w := name.split()[0]).isalpha() and w[:1].isupper() and w not in head})
    picked = random.Random(f"{rome.params.seed}:{subject}").sample(words, min(n, len(words)))
    siblings = [" ".join(article + [w, last]) for w in picked]
    return names + [s for s in siblings if s != subject and s not in names]


class MemoSolver(Solver):
    """A Solver that remembers its answers by the keys' content: one edit's insert is re-run for each α
    of the family term and solves for the same few keys every time."""

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


def text_energy(second_moment: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> float:
    """E‖Δk‖² over the keys the statistics saw (C = E[k kᵀ]): tr(Δ C Δᵀ) = ‖u‖² vᵀCv for Δ = u vᵀ, and
    tr(UᵀU · VᵀCV) for a rank-r Δ = U Vᵀ. The mean squared change the update makes to the layer's output
    on generic text: what Eq. 2 minimises, and what the family term may raise only within a budget."""
    c = second_moment.to(v.device, torch.float64)
    u64, v64 = u.double().reshape(u.shape[0], -1), v.double().reshape(v.shape[0], -1)  # (d_out, r), (d_in, r)
    return float(((u64.T @ u64) * (v64.T @ c @ v64)).sum())


def family_factor(rome: Rome, layer: int, subject: str) -> torch.Tensor | None:
    """B (d_in, f), float64, with B Bᵀ = F̃ = (tr C / tr F) F, F = mean k kᵀ over the bare keys of the
    subject's family (``family``): the family's second moment scaled to C's size; None when it has none."""
    names = family(rome, subject)
    if not names:
        return None
    device = rome.solver(layer).device  # where the family's solver will run
    keys = rome.bare_keys(layer, names).to(device, torch.float64)  # (f, d_in)
    trace_c = rome.second_moment(layer).to(device, torch.float64).diagonal().sum()
    trace_f = (keys * keys).sum() / len(names)  # tr F = mean ‖k‖²
    return keys.T * (trace_c / trace_f / len(names)).sqrt()  # (d_in, f)


def centroid(rome: Rome, request: EditRequest, layer: int, solve: Solver, k_star: torch.Tensor,
             protected: torch.Tensor | None) -> torch.Tensor | None:
    """The family's mean key k̄ (1, d_in) for the insert to hold fixed (Δ k̄ = 0): the mean of the bare
    keys of ``family`` (reference names and made-up siblings; not the subject itself).

    At an early layer the key at a subject's last token is mostly that token's: most of k* lies along k̄,
    and a rank-one update moves every member of the family by ~⅔ of the edit (docs/specificity.md). With
    k̄ held, a member k_j = k̄ + e_j only moves by vᵀe_j. None when the subject has no family, or when k̄,
    with the ``protected`` keys (m, d_in), would leave less than ``min_residual`` of k* to edit."""
    names = [s for s in family(rome, request.subject) if s != request.subject]
    if not names:
        return None
    mean = rome.bare_keys(layer, names).mean(0, keepdim=True).to(k_star.device)  # (1, d_in)
    keys = mean if protected is None else torch.cat([protected, mean])
    return mean if residual_share(solve, k_star, keys) >= rome.spec.min_residual else None


# --------------------------------------------------------------------------------------------------
# The edit's own keys: the rewrite prompt's and the context prefixes'
# --------------------------------------------------------------------------------------------------


def context_keys(rome: Rome, request: EditRequest, layer: int) -> torch.Tensor:
    """The keys the context-key constraints write the edit's change at (n, d_in): with ``prefix_keys``
    the key of each context prefix + subject (k* is their mean, Eq. 3; row 0, the bare subject, is the
    paper's k_d), then, with ``prompt_key``, the rewrite prompt's own key (when its template does not
    start with the subject: then it is row 0 already). Cached for the edit."""
    spec, cache_key = rome.spec, ("context", layer, request.subject, request.relation)
    if cache_key not in rome.scratch:
        keys = []
        if spec.prefix_keys:
            keys.append(subject_keys(rome.lm, layer, [x + "{}" for x in rome.prefixes], request.subject))
        if spec.prompt_key and not (spec.prefix_keys and request.relation.startswith("{}")):
            keys.append(subject_keys(rome.lm, layer, [request.relation], request.subject))
        rome.scratch[cache_key] = torch.cat(keys)
    return rome.scratch[cache_key]


def with_context_keys(rome: Rome, request: EditRequest, layer: int, solve: Solver, k_star: torch.Tensor,
                      v_star: torch.Tensor, k_d: torch.Tensor, protected: torch.Tensor | None,
                      rank_one: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The insert with the edit's change δ = v* − W k* (what v* was optimised with, at every prompt's
    subject token) written at more of the subject's own keys than k*:

    - ``prompt_key``: the rewrite prompt's key k_p (at its last subject token), which k* only
      approximates: Δ k* = δ and Δ k_p = δ;
    - ``prefix_keys``: each context prefix's key k_i instead of only their mean k*: Δ k_i = δ for every i
      (which implies Δ k* = δ). A paraphrase puts the subject after other text; its key is one more such k.

    With symmetric keys every constraint asks for the same δ, so the update stays rank one:
    u = δ, v = C⁻¹K M⁻¹ 1 with vᵀk_i = 1 and vᵀk_j = 0 for the protected keys. (Asking Ŵ k_p = v*
    instead would make Δ (k_p − k*) = −W (k_p − k*): the layer's response along the difference of
    two near-identical keys wiped out.) Without symmetric keys the bare prompt's key keeps the
    paper's Ŵ k_d = v*: a rank-2 update. The update without these constraints (``rank_one``) is kept
    when they cannot be separated (for C, the prompt's key is k* already)."""
    module = edited_module(rome.lm.model, layer)
    spec = rome.spec
    extra = context_keys(rome, request, layer)  # (n, d_in)
    delta = v_star - module_output(module, k_star[None])[0]  # (d_out,) δ
    r_d = v_star - module_output(module, k_d[None])[0]  # (d_out,) the edit's own residual at k_d
    if spec.prefix_keys:  # the prefix keys replace their mean; row 0 is the bare prompt's key k_d
        keys, con = extra, None  # (n, d_in), constrained where they point
        residuals = torch.stack([r_d] + [delta] * (extra.shape[0] - 1))  # (n, d_out)
    else:
        if residual_share(solve, extra[0], k_star[None]) < spec.min_residual:
            return rank_one  # the prompt's key is (for C) k* already
        keys, con = torch.stack([k_star, extra[0]]), torch.stack([k_d, extra[0]])
        residuals = torch.stack([r_d, delta])  # (2, d_out)
    try:
        u, v = insert_many(solve, keys, residuals, con, protected, spec.ridge,
                           0.0 if spec.prefix_keys else spec.min_residual)
    except InsertError:
        return rank_one
    if rome.params.symmetric_keys:  # every column of U is the same δ: one rank-one update
        return u[:, 0], v.sum(1)
    return u[:, :2], torch.stack([v[:, 0], v[:, 1:].sum(1)], 1)  # (d_out, 2), (d_in, 2): k_d's, the rest's


# --------------------------------------------------------------------------------------------------
# The insert
# --------------------------------------------------------------------------------------------------


def build(rome: Rome, request: EditRequest, layer: int, k_star: torch.Tensor, v_star: torch.Tensor,
          k_d: torch.Tensor, hold: torch.Tensor | None = None) -> Insertion:
    """Eq. 2 for one edit with everything the insert asks for: the protected keys held fixed (and
    ``hold``, earlier edits' keys, where separable), the context keys, the family's mean key, and the
    family term within its energy budget.

    The family term trades the update's energy on generic text, tr(ΔCΔᵀ) (``text_energy``), for its
    energy on the family's keys. The first α = family_weight / 2^i (i = 0 .. FAMILY_HALVINGS) whose
    update stays within max_energy × the energy of the update without the family term is used; if none
    does, the update without it."""
    spec = rome.spec

    def solve_with(solve: Solver) -> Insertion:
        names, protected_keys = rome.protected_keys(request, layer, k_star, solve)
        protected_keys = protected_keys if names else None
        protected = rome.held_separable(solve, k_star, protected_keys, hold)
        held = 0 if protected is None else protected.shape[0] - (0 if protected_keys is None
                                                                  else protected_keys.shape[0])
        mean = centroid(rome, request, layer, solve, k_star, protected) if spec.centroid else None
        if mean is not None:  # held here, and by the stack's joint solve (the delta's last protected key)
            protected = mean if protected is None else torch.cat([protected, mean])
            protected_keys = mean if protected_keys is None else torch.cat([protected_keys, mean])
        u, v = insert(solve, k_star, v_star, k_d, rome.module_out(layer, k_d), protected, spec.ridge, spec.min_residual)
        if spec.prompt_key or spec.prefix_keys:
            u, v = with_context_keys(rome, request, layer, solve, k_star, v_star, k_d, protected, (u, v))
        info = {} if not spec.centroid else {"centroid": mean is not None}
        return Insertion(u, v, names, protected_keys, held, {"alpha": 0.0, "energy_ratio": 1.0, **info})

    base = MemoSolver(rome.solver(layer))  # every α solves for the same keys again (C⁻¹ k)
    plain = solve_with(base)
    factor = family_factor(rome, layer, request.subject) if spec.family_weight > 0 else None
    if factor is None:
        return plain
    second_moment = rome.second_moment(layer).to(factor.device, torch.float64)  # (converted once, not per α)
    energy = text_energy(second_moment, plain.u, plain.v)
    if energy == 0.0:  # δ = 0: the edit holds already (v* needed no step), nothing to keep off the family
        return plain
    c_inv_b = None  # C⁻¹B, shared by every α
    for i in range(FAMILY_HALVINGS + 1):
        alpha = spec.family_weight / 2 ** i
        solve = rome.scratch.get(("family", layer, request.subject, alpha))
        if solve is None:  # kept for this edit: insert_direction and the insert itself ask for the same
            solve = rome.scratch[("family", layer, request.subject, alpha)] = WoodburySolver(base, factor, alpha, c_inv_b)
        c_inv_b = solve.c_inv_b
        made = solve_with(solve)
        ratio = text_energy(second_moment, made.u, made.v) / energy
        if ratio <= spec.max_energy:
            made.family.update(alpha=alpha, energy_ratio=ratio)
            return made
    return plain


@torch.no_grad()
def insert_direction(rome: Rome, request: EditRequest, layer: int, k_star: torch.Tensor, k_d: torch.Tensor,
                     hold: torch.Tensor | None = None) -> torch.Tensor:
    """The insert's direction v (d_in,), scaled so that vᵀk_d = 1: the update is δ vᵀ (Δ k_d = δ)
    whatever v* is, so it is known before v* is optimised. The insert is run with a stand-in v*.
    (With the paper's asymmetric keys and the prompt key, the column of the bare prompt's change.)"""
    v = build(rome, request, layer, k_star, rome.module_out(layer, k_d) + 1.0, k_d, hold).v
    v = v.reshape(v.shape[0], -1)[:, 0]  # (d_in,)
    return v / (v @ k_d)


@torch.no_grad()
def least_share(rome: Rome, request: EditRequest, layer: int, u: torch.Tensor, v: torch.Tensor) -> float:
    """The least share s of the update u vᵀ at which the rewrite prompt still prefers the new object
    over the old one by the insert's ``shrink_margin`` (mean per-token log-probability; ``least_scale``).
    The old object is ``target_true``, or the model's own next token before the edit when none is given."""
    module = edited_module_name(rome.lm.model, layer)
    old = request.target_true or next_token(rome.lm, request.prompt)
    w0 = read_weight(rome.lm.model, module)
    try:
        return least_scale(margin_under(rome.lm, module, u, v, request.prompt, request.target, old),
                           rome.spec.shrink_margin, rome.spec.shrink_steps)
    finally:
        write_weight(rome.lm.model, module, w0)
