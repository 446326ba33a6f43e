"""Composing deltas into one model: base + deltas by ``stack.method`` (docs/method.md).

``EditedModel`` keeps the base weights of every module a delta touched and rebuilds base + deltas from
them on every ``compose``: the sum of the deltas' updates (``stack.method: sum``), or with a
``JointSolve`` the one update per module re-solved from all the deltas' (k*, v*) pairs
(``stack.method: joint``), optionally calibrated (``stack.margin``). Gated deltas (hidden units) are
appended in a canonical order either way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from ..engine.gated import (MAX_LOW, TEXT_TOKENS, Gate, NeuronUpdate, _mlp_parts, add_neurons, closing_low,
                            cut_neurons, gate_examples, gate_values, hidden_width, logistic_direction, slope,
                            text_inputs)
from ..engine.joint import joint_insert, null_space_basis, projected_solver
from ..engine.margins import margins, next_token
from ..engine.models import LoadedModel, read_weight, write_weight
from ..engine.prompts import fill
from ..engine.rome import EditRequest, InsertError, RankOneUpdate, Rome, RomeParams, Solver, add_rank_one
from ..engine.statistics import Corpus, token_rows, wikipedia_corpus
from ..params import StackParams
from . import neurons
from .deltas import (Delta, DeltaError, KeyValue, check_applicable, check_distinct, edits, is_gated,
                     require_pairs)


class EditedModel:
    """A base model with deltas on top, composed by ``stack.method``: W = W_base + Σ_deltas Σ_edits u vᵀ in
    the order given (``joint`` None: sum), or W_base + the joint solve's update (a ``JointSolve``).

    Every command that puts deltas on a model builds one of these with params.yaml's composition
    (``composition``), so a set of deltas is the same model wherever it is scored or written: one delta
    too (under ``joint`` it is the joint solve of that one delta, re-solved from its pairs).

    Base weights of every module a delta touched are kept (one (d_out, d_in) copy each), and every
    composition starts again from them.
    """

    def __init__(self, lm: LoadedModel, joint: "JointSolve | None" = None):
        self.lm = lm
        self.joint = joint  # how compose() composes: None sum, else the joint solve (stack.method)
        self.deltas: list[Delta] = []
        self.updates: list[RankOneUpdate] = []  # the linear updates in place now (what a LoRA export holds)
        self.scales: torch.Tensor | None = None  # each edit's share of its change, when the stack is calibrated
        self.gates: list[dict] | None = None  # each gated edit's thresholds as composed, when stack.gate_text raised them
        self._base: dict[str, torch.Tensor] = {}
        self._widths: dict[int, int] = {}  # layer -> its MLP's hidden units in the base model (gated edits)

    @property
    def method(self) -> str:
        return "sum" if self.joint is None else "joint"

    def composed_by(self) -> dict:
        """{method, settings (joint)}: what the reports and the stack file record; ``composed_by(stack)`` of
        the params.yaml that built this model."""
        return {"method": self.method, **({} if self.joint is None else {"settings": self.joint.settings()})}

    def compose(self, deltas: list[Delta], joint: "JointSolve | None" = None) -> None:
        """base + deltas by this model's composition: the sum of their factors (``self.joint`` None), or the
        one update that the joint solve recomputes from all their (k*, v*) pairs (stack.method: joint).
        ``joint``: another joint solve for this call only (bench stack's methods)."""
        joint = self.joint if joint is None else joint
        check_distinct(deltas)
        for d in deltas:
            check_applicable(d, self.lm)
        if joint is not None:
            joint.check(deltas)
        self._keep_base(deltas, [])
        self.scales, self.gates, units = None, None, deltas
        if joint is not None and joint.gate_text > 0 and any(is_gated(d) for d in deltas):
            self._write([])  # the thresholds are raised against the base model's inputs
            self.gates = joint.raised_gates(self.lm, deltas)
            units = with_gates(deltas, self.gates)
        if joint is None:
            updates = [up for d in deltas for up in d.updates if isinstance(up, RankOneUpdate)]
        elif joint.margin > 0 and deltas and not any(is_gated(d) for d in deltas):
            self.scales = self.calibrate(deltas, joint)
            updates = joint.updates(deltas, self._base, self.scales)
        else:
            updates = joint.updates(deltas, self._base)
        self._write(updates, units)
        self.deltas, self.updates = list(deltas), updates

    def rebuild(self, deltas: list[Delta], updates: list[RankOneUpdate], gates: list[dict] | None = None) -> None:
        """base + ``updates`` (linear, already composed: a stack file's solved update) + the neurons of the
        gated ones among ``deltas`` (with ``gates``, each gated edit's thresholds as composed): the weights
        of the composition that produced them, without solving again (``stackfile.StackFile``)."""
        check_distinct(deltas)
        for d in deltas:
            check_applicable(d, self.lm)
        self._keep_base(deltas, updates)
        self.scales, self.gates = None, gates
        self._write(updates, deltas if gates is None else with_gates(deltas, gates))
        self.deltas, self.updates = list(deltas), list(updates)

    def reset(self) -> None:
        self.compose([])

    def _keep_base(self, deltas: list[Delta], updates: list[RankOneUpdate]) -> None:
        """Remember the base weight of every module, and the base width of every MLP, about to be touched."""
        for up in [up for d in deltas for up in d.updates] + list(updates):
            if isinstance(up, NeuronUpdate):
                if up.layer not in self._widths:  # untouched so far, so still the base model's width
                    self._widths[up.layer] = hidden_width(self.lm.model, up.layer)
            elif up.module not in self._base:  # untouched so far, so still the base weight
                self._base[up.module] = read_weight(self.lm.model, up.module)

    def _write(self, updates: list, deltas: list[Delta] = ()) -> None:
        """Base weights and widths, then the rank-one ``updates`` added and the neurons of ``deltas`` appended
        in the canonical order (``neurons.canonical``: the same weights whatever the deltas' order)."""
        for layer, width in self._widths.items():
            cut_neurons(self.lm.model, layer, width)
        for name, w in self._base.items():
            write_weight(self.lm.model, name, w)
        for up in updates:
            if isinstance(up, RankOneUpdate):
                add_rank_one(self.lm.model, up.module, up.u, up.v)
        for up in neurons.canonical(deltas):
            add_neurons(self.lm.model, up)

    def calibrate(self, deltas: list[Delta], joint: "JointSolve") -> torch.Tensor:
        """Each edit's share s_j of its change (stack.margin): the least, to 2^-rounds, at which its
        rewrite prompt prefers the new object over the old one by ``joint.margin`` on the composed
        model itself (mean per-token log-probability, as ES; with ``joint.prefixes``, the mean margin
        of the prompt alone and after that many of v*'s context prefixes). All edits bisect at once: each round
        solves the stack with the midpoints, scores every rewrite prompt in one batched pass, and
        halves each edit's interval. An edit that does not hold even whole keeps s_j = 1.

        v* overshoots (a median margin of ~9 nats on its own prompt), and the excess is damage
        that adds up over a stack; in the stack, cross-talk and the ridge also move each edit's
        margin, which is why the shares are found there and not per delta (docs/scale.md)."""
        pairs = edits(deltas)
        canon = [d.meta["manifest"]["canonical"]["edits"][i] for d, i in pairs]
        rewrites = [fill(e["relation"], e["subject"]) for e in canon]
        self._write([])  # the base model: the old object of an edit that names none is its answer
        olds = [e.get("target_true") or next_token(self.lm, p) for e, p in zip(canon, rewrites)]
        asked = [calibration_prompts(d, p, joint.prefixes) for (d, _), p in zip(pairs, rewrites)]  # per edit
        prompts = [q for qs in asked for q in qs]
        targets = [e["target"] for e, qs in zip(canon, asked) for _ in qs]
        old_of = [o for o, qs in zip(olds, asked) for _ in qs]
        owner = torch.tensor([j for j, qs in enumerate(asked) for _ in qs])  # (prompts,) the edit of each prompt
        count = torch.bincount(owner, minlength=len(pairs)).double()  # (n,)
        lo, hi = torch.zeros(len(pairs), dtype=torch.float64), torch.ones(len(pairs), dtype=torch.float64)
        for _ in range(joint.rounds):
            mid = (lo + hi) / 2
            self._write(joint.updates(deltas, self._base, mid))
            m = margins(self.lm, prompts, targets, old_of).double()  # (prompts,)
            mean = torch.zeros(len(pairs), dtype=torch.float64).index_add(0, owner, m) / count  # (n,)
            held = mean >= joint.margin
            hi, lo = torch.where(held, mid, hi), torch.where(held, lo, mid)
        return hi


def calibration_prompts(delta: Delta, rewrite: str, prefixes: int) -> list[str]:
    """The prompts whose mean margin calibrates an edit: its rewrite prompt, and after ``prefixes`` of
    the delta's own context prefixes (those v* was optimised over), evenly spaced over the list."""
    own = [p for p in delta.meta.get("context_prefixes", []) if p]
    if prefixes <= 0 or not own:
        return [rewrite]
    n = min(prefixes, len(own))
    picks = sorted({round(i * (len(own) - 1) / max(n - 1, 1)) for i in range(n)})
    return [rewrite] + [own[i] + rewrite for i in picks]


def gated_edits(deltas: list[Delta]) -> list[tuple[Delta, int]]:
    """The gated edits of a stack, in the order of ``edits(deltas)``."""
    return [(d, i) for d, i in edits(deltas) if isinstance(d.updates[i], NeuronUpdate)]


def with_gates(deltas: list[Delta], gates: list[dict]) -> list[Delta]:
    """Copies of ``deltas`` whose gated edits have the thresholds ``gates`` ({low, high, beta}, and a (d_model,)
    where stack.gate_refit refitted the direction; one per gated edit in the order of ``gated_edits``) instead
    of their own; the same δ, the same canonical order (``neurons.canonical`` reads the metadata, kept)."""
    pairs = gated_edits(deltas)
    if len(gates) != len(pairs):
        raise DeltaError(f"the stack's gates: {len(gates)} thresholds for {len(pairs)} gated edits")
    new = {id(d): list(d.updates) for d in deltas}
    for (d, i), g in zip(pairs, gates):
        old = stored_gate(d.updates[i], d.meta["edits"][i]["gate"])
        a = g["a"].float() if "a" in g else old.a
        want = Gate(a, old.e, float(g["low"]), float(g["high"]), float(g["beta"]), old.gated)
        if (want.low, want.high, want.beta) != (old.low, old.high, old.beta) or "a" in g:
            new[id(d)][i] = rethreshold(d.updates[i], old, want)
    return [Delta(new[id(d)], d.meta, d.path, d.pairs) for d in deltas]


class JointSolve:
    """The composed update of a stack, recomputed from all its deltas' (k*, v*) pairs in one call of
    ``joint.joint_insert`` per edited module (docs/method.md, "The joint stack solve").

    second_moment: layer -> C (the statistics the deltas were computed with); ridge, null_space
    (the threshold of ``null_space_basis``) and protect (hold each edit's protected keys fixed) are
    params.yaml's ``stack.ridge``, ``stack.null_space`` and ``stack.protect``. Factorisations are cached
    per layer, so re-solving after dropping a delta costs one solve. stats_sha256: layer -> sha256 of
    the statistics file C came from (provenance for the stack file; {} when not known).
    """

    def __init__(self, second_moment: Callable[[int], torch.Tensor], ridge: float = 0.0, null_space: float = 0.0,
                 protect: bool = True, margin: float = 0.0, rounds: int = 7, prefixes: int = 0,
                 stats_sha256: dict[int, str] | None = None, gate_text: int = 0, corpus: Corpus | None = None,
                 gate_refit: bool = False, root: Path = Path(".")):
        self.second_moment, self.ridge, self.null_space, self.protect = second_moment, ridge, null_space, protect
        # the calibration (EditedModel.calibrate); margin 0: off
        self.margin, self.rounds, self.prefixes = margin, rounds, prefixes
        self.stats_sha256 = dict(stats_sha256 or {})
        # gated deltas: thresholds raised to close gate_text tokens of the corpus (raised_gates); 0: off
        self.gate_text, self.corpus = gate_text, corpus
        # ... and a gate the cap leaves open on some of them refitted against those (refit_gate); root: the folder
        # that the deltas' rome.protect_sources are relative to (the project's)
        self.gate_refit, self.root = gate_refit, Path(root)
        self._editors: dict[str, Rome] = {}
        self._solvers: dict[int, tuple[Solver, torch.Tensor | None]] = {}
        self._calibration: dict[int, torch.Tensor] = {}  # layer -> the base model's x at those tokens

    @classmethod
    def from_params(cls, second_moment: Callable[[int], torch.Tensor], p,
                    stats_sha256: dict[int, str] | None = None, corpus: Corpus | None = None,
                    root: Path = Path(".")) -> "JointSolve":
        """From params.yaml's ``stack:`` (a ``params.StackParams``); ``corpus``: the statistics' (stats.corpus);
        ``root``: the project's folder."""
        return cls(second_moment, p.ridge, p.null_space, p.protect, p.margin, p.rounds, p.prefixes, stats_sha256,
                   p.gate_text, corpus, p.gate_refit, root)

    def settings(self) -> dict:
        """What the solve depends on besides the deltas and C, as ``StackParams.joint_settings`` says it
        (the calibration's fields only when it is on, gate_text only when set)."""
        return StackParams(method="joint", ridge=self.ridge, null_space=self.null_space, protect=self.protect,
                           margin=self.margin, rounds=self.rounds, prefixes=self.prefixes,
                           gate_text=self.gate_text, gate_refit=self.gate_refit).joint_settings()

    def raised_gates(self, lm: LoadedModel, deltas: list[Delta]) -> list[dict]:
        """Each gated edit's thresholds {low, high, beta} with τ₀ raised until every one of ``gate_text`` corpus
        tokens is exactly closed, at most gated.MAX_LOW (never lowered; τ₁ by as much), in the order of
        ``gated_edits``. With gate_refit, a gate the cap leaves open on some of those tokens is refitted against
        them (``refit_gate``), and the refit kept (its direction under "a") when it leaves fewer open. Each gate
        alone, against the inputs of ``lm`` as it is (the caller's base model), so the result depends on
        neither the order nor the other deltas."""
        out = []
        for d, i in gated_edits(deltas):
            up, stored = d.updates[i], d.meta["edits"][i].get("gate")
            if stored is None:
                raise DeltaError(f"{d.path or d.name}: edits[{i}].gate: no thresholds recorded, so stack.gate_text "
                                 f"cannot raise them; recompute the delta")
            if up.layer not in self._calibration:
                corpus = self.corpus or wikipedia_corpus()
                self._calibration[up.layer] = calibration_inputs(lm, up.layer, corpus, self.gate_text)  # (N, d_model)
            x = self._calibration[up.layer]  # (N, d_model)
            old = stored_gate(up, stored)
            g, refit = raise_gate(lm.model, old, up.layer, x), None
            if self.gate_refit and closing_low(old.a, old.e, old.gated, x) > MAX_LOW:  # the cap leaves some open
                act = _mlp_parts(lm.model, up.layer)[3]
                open_ = gate_values(g, act, x) != 0  # (N,)
                refit = refit_gate(self.editor(lm, d), request_of(d, i), up.layer, old, x[open_])
                if refit is not None:
                    refit = raise_gate(lm.model, refit, up.layer, x)
                    # kept only when it leaves fewer of those tokens open than the capped stored direction
                    refit = refit if int((gate_values(refit, act, x) != 0).sum()) < int(open_.sum()) else None
                g = g if refit is None else refit
            out.append({"low": g.low, "high": g.high, "beta": g.beta, **({} if refit is None else {"a": g.a})})
        return out

    def editor(self, lm: LoadedModel, d: Delta) -> Rome:
        """A ``Rome`` with the delta's hyper-parameters and its own context prefixes (what its gate was fitted
        on), one per set of hyper-parameters and prefixes."""
        hyper, prefixes = d.meta["hyperparameters"], list(d.meta["context_prefixes"])
        key = json.dumps([hyper, prefixes], sort_keys=True)
        if key not in self._editors:
            rome = Rome(lm, RomeParams.from_dict(hyper), self.second_moment, self.root, corpus=self.corpus)
            rome._prefixes = prefixes  # the prefixes the insert used, not generated again
            self._editors[key] = rome
        return self._editors[key]

    def solver(self, layer: int) -> tuple[Solver, torch.Tensor | None]:
        if layer not in self._solvers:
            c = self.second_moment(layer)
            basis = null_space_basis(c, self.null_space)
            self._solvers[layer] = (Solver(c) if basis is None else projected_solver(c, basis), basis)
        return self._solvers[layer]

    @staticmethod
    def check(deltas: list[Delta]) -> None:
        """Linear deltas need their k*/v* pairs; gated ones (neurons) are composed as they are, so a stack of
        gated deltas passes, and a stack that mixes both is refused (one line naming one of each). Needs no
        model: commands call it before one loads."""
        gated = [d for d in deltas if is_gated(d)]
        if gated and len(gated) < len(deltas):
            linear = next(d for d in deltas if not is_gated(d))
            raise DeltaError(f"stack.method: joint: {gated[0].path or gated[0].name} is a gated edit and "
                             f"{linear.path or linear.name} a linear one; the joint solve re-solves linear edits "
                             f"only: recompute them with one rome.insert, or use stack.method: sum")
        for d in deltas:
            if not is_gated(d):
                require_pairs(d)

    @staticmethod
    def protected_rows(d: Delta, i: int, kv: KeyValue, edited: set[str]) -> torch.Tensor | None:
        """Edit i's protected keys, less those of subjects that an edit of the stack rewrites (two rows a
        subject, in the order of ``edits[i].protected``; then, with ``edits[i].centroid``, the family's
        mean key, always kept): an edit wins over another's protection."""
        if kv.protected is None:
            return None
        names = d.meta["edits"][i].get("protected", [])
        centroid = 1 if d.meta["edits"][i].get("centroid") else 0
        if len(names) * 2 + centroid != kv.protected.shape[0]:
            return kv.protected
        keep = [r for r in range(kv.protected.shape[0]) if r >= 2 * len(names) or names[r // 2] not in edited]
        return kv.protected[keep] if keep else None

    def updates(self, deltas: list[Delta], base: dict[str, torch.Tensor],
                scales: torch.Tensor | None = None) -> list[RankOneUpdate]:
        """One rank-≤n update per module, from the base weights (module -> (d_out, d_in)).

        scales: one per edit of the stack, in the order of ``edits(deltas)``: edit j asks for
        W k_j + s_j (v_j − W k_j) (the calibration of ``EditedModel.compose``); None: all 1. A stack of
        gated deltas has no linear update to solve ([]): its neurons are appended as they are."""
        self.check(deltas)
        if any(is_gated(d) for d in deltas):
            return []
        by_module: dict[str, list[tuple[Delta, int, KeyValue]]] = {}
        share: dict[str, list[float]] = {}
        for j, (d, i) in enumerate(edits(deltas)):
            kv = d.pairs[i]
            by_module.setdefault(kv.module, []).append((d, i, kv))
            share.setdefault(kv.module, []).append(1.0 if scales is None else float(scales[j]))
        out = []
        for module, items in by_module.items():
            layer = items[0][2].layer
            solve, basis = self.solver(layer)
            keys = torch.stack([kv.k_star for _, _, kv in items])  # (n, d_in)
            values = torch.stack([kv.v_star for _, _, kv in items])  # (n, d_out)
            edited = {d.meta["manifest"]["canonical"]["edits"][i]["subject"] for d, i, _ in items}
            held = [self.protected_rows(d, i, kv, edited) for d, i, kv in items] if self.protect else []
            held = [h for h in held if h is not None]
            protected = torch.cat(held) if held else None
            try:
                u, v = joint_insert(solve, base[module], keys, values, protected, self.ridge, basis,
                                    scales=None if scales is None else torch.tensor(share[module], dtype=torch.float64))
            except InsertError as e:
                if e.index is None or e.index >= len(items):
                    raise DeltaError(f"stack.method: joint: {module}: {e}; set stack.ridge > 0 for a "
                                     f"least-squares solve") from None
                d, i, _ = items[e.index]
                raise DeltaError(f"{d.path or d.name}: edits[{i}]: the joint solve cannot separate its key from "
                                 f"the other edits' ({e}); set stack.ridge > 0 for a least-squares solve") from None
            out.append(RankOneUpdate(module, layer, u, v))
        return out


def composition(stack: StackParams, second_moment: Callable[[int], torch.Tensor],
                stats_sha256: dict[int, str] | None = None, corpus: Corpus | None = None,
                root: Path = Path(".")) -> JointSolve | None:
    """How params.yaml's ``stack:`` composes deltas, for ``EditedModel(lm, composition(...))``: None for
    ``stack.method: sum`` (base + Σ deltas), else the joint solve with ``stack``'s settings over the
    statistics ``second_moment`` (layer -> C, read only when a linear delta of that layer is solved)."""
    if stack.method == "sum":
        return None
    return JointSolve.from_params(second_moment, stack, stats_sha256, corpus, root)


def composed_by(stack: StackParams) -> dict:
    """{method, settings (joint: ``stack.joint_settings()``)}: params.yaml's composition, as
    ``EditedModel.composed_by`` records it."""
    return {"method": stack.method, **({} if stack.method == "sum" else {"settings": stack.joint_settings()})}


# --------------------------------------------------------------------------------------------------
# A threshold raised at composition (stack.gate_text; docs/scale.md, "A threshold raised at composition")
# --------------------------------------------------------------------------------------------------


def stored_gate(up: NeuronUpdate, thresholds: dict) -> Gate:
    """The gate whose two units ``up`` are, from the delta's thresholds {low, high, beta} (``edits[i].gate``):
    gate rows β(a − τ₀e), β(a − τ₁e) and up rows e (gated MLP), or rows βa and biases −βτ (MLP with biases)."""
    b, lo, hi = float(thresholds["beta"]), float(thresholds["low"]), float(thresholds["high"])
    gated_mlp = up.up is not None
    e = up.up[0].float() if gated_mlp else torch.zeros(up.gate.shape[1])  # (d_model,)
    a = up.gate[0].float() / b + lo * e  # (d_model,)
    return Gate(a, e, lo, hi, b, gated_mlp)


def calibration_inputs(lm: LoadedModel, layer: int, corpus: Corpus, n_tokens: int) -> torch.Tensor:
    """x (n, d_model) at the statistics corpus's ``n_tokens`` text tokens that follow the gate's own
    ``gated.TEXT_TOKENS`` negatives (so the insert never saw them), in rows as the insert reads its own."""
    config = lm.model.config
    longest = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 257)
    seq_len = min(256, longest - 1)
    skip = -(-TEXT_TOKENS // seq_len)  # the insert's rows (its last one may be part of a row here: skipped whole)
    rows = list(token_rows(lm, corpus, skip * seq_len + n_tokens, seq_len))
    return text_inputs(lm, layer, rows[skip:])


def raise_gate(model, gate: Gate, layer: int, x: torch.Tensor, cap: float = MAX_LOW) -> Gate:
    """``gate`` with τ₀ raised to the least value at which every input x (n, d_model) is exactly closed, at
    most ``cap`` (never lowered), τ₁ by as much, and β for the new τ₁; ``gate`` itself when it already is."""
    need = closing_low(gate.a, gate.e.to(gate.a), gate.gated, x.to(gate.a))
    shift = max(0.0, min(need, cap) - gate.low)
    if shift == 0.0:
        return gate
    high = gate.high + shift
    return Gate(gate.a, gate.e, gate.low + shift, high, slope(model, layer, high), gate.gated)


def request_of(d: Delta, i: int) -> EditRequest:
    """The request of the delta's i-th edit, from its manifest's canonical form."""
    e = d.meta["manifest"]["canonical"]["edits"][d.meta["edits"][i].get("index", i)]
    return EditRequest(e["subject"], e["relation"], e["target"], e.get("target_true"), tuple(e.get("protect", ())))


def refit_gate(rome: Rome, request: EditRequest, layer: int, old: Gate, hard: torch.Tensor) -> Gate | None:
    """``old`` with its direction refitted (stack.gate_refit): the insert's regression (``gated.gate_examples``:
    the same positives, family, prompt tokens, protected subjects and text) with ``hard`` (m, d_model), the
    calibration tokens the capped threshold leaves open, as one more group of negatives. s(x*) = 1 again, e
    and δ kept, τ₀ and τ₁ raised as the insert raises them to close the family and the protected subjects (at
    most MAX_LOW). None when the refit no longer scores its own prompt above 0 or leaves a protected subject
    open: the stored direction is kept then."""
    pos, negatives, text = gate_examples(rome, request, layer)
    a = logistic_direction(pos, negatives + [hard], text, rome.spec.gate_l2)  # (d_model,) float64
    x_star = pos[-1].double()  # the rewrite prompt's input
    if not float(x_star @ a) > 0:
        return None
    a = (a / (x_star @ a)).float()  # s(x*) = 1
    family, _rest, held = negatives
    need = closing_low(a, old.e, old.gated, torch.cat([family, held]))
    shift = max(0.0, min(need, MAX_LOW) - old.low)
    g = Gate(a, old.e, old.low + shift, old.high + shift, slope(rome.lm.model, layer, old.high + shift), old.gated)
    if len(held) and (gate_values(g, _mlp_parts(rome.lm.model, layer)[3], held) != 0).any():
        return None
    return g


def rethreshold(up: NeuronUpdate, old: Gate, new: Gate) -> NeuronUpdate:
    """The two units of ``new`` with the change δ that ``up`` (whose gate is ``old``) adds when fully open."""
    delta = up.down[:, 0] * old.beta * (old.high - old.low)  # (d_model,) δ: down = [δ, −δ] / (β(τ₁ − τ₀))
    return new.update(up.module, up.layer, delta)
