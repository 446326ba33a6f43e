"""Entity-level specificity: the generalised insert (Eq. 2 with protected keys), choosing protected
subjects, and mining token-sharing neighbours (NS_tok) from records."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from romeflow.engine import models
from romeflow.evaluation.datasets import CounterfactRecord, Fact, mine_token_neighbors
from romeflow.pipeline.manifests import ManifestError, load_manifest
from romeflow.evaluation.metrics import score_ci
from romeflow.engine import inserts
from romeflow.engine.inserts import InsertSpec, MemoSolver, WoodburySolver, family, text_energy
from romeflow.engine.protect import NameIndex, reference_names, residual_share
from romeflow.engine.rome import EditRequest, InsertError, Rome, RomeParams, Solver, insert, insert_many

from conftest import ARCHS, EDIT_LAYER

PARAMS = RomeParams(layer=EDIT_LAYER, prefix_lengths=(3,), prefixes_per_length=2, steps=4, seed=0)
CURIE = EditRequest("Pierre Curie", "{} worked in the field of", "medicine", "physics",
                    protect=("Marie Curie", "Albert Einstein"))


def spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 3 * n, generator=g)
    return a @ a.T / (3 * n) + 0.1 * torch.eye(n)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def rome_with(lm, stats, spec: InsertSpec = InsertSpec(), params: RomeParams = PARAMS) -> Rome:
    """An editor with one insert's settings (a row of inserts.INSERTS, or a single option of one)."""
    rome = Rome(lm, params, lambda layer: stats[layer])
    rome.spec = spec
    return rome


# --------------------------------------------------------------------------------------------------
# The generalised insert
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
def test_insert_without_protected_keys_is_the_rank_one_insert(symmetric):
    d_out, d_in = 6, 10
    g = torch.Generator().manual_seed(3)
    c = spd(d_in, 4)
    w = torch.randn(d_out, d_in, generator=g)
    k_star, v_star = torch.randn(d_in, generator=g), torch.randn(d_out, generator=g)
    k_d = k_star if symmetric else k_star + 0.3 * torch.randn(d_in, generator=g)
    u, v = insert(Solver(c), k_star, v_star, k_d, w @ k_d, None, ridge=1e-6, min_residual=0.05)
    # The paper's closed form, in float64: Λ = (v* − W k_d) / ((C⁻¹k*)ᵀ k_d), ΔW = Λ (C⁻¹k*)ᵀ.
    c_inv_k = torch.linalg.solve(c.double(), k_star.double())
    lam = (v_star.double() - w.double() @ k_d.double()) / (c_inv_k @ k_d.double())
    assert rel(torch.outer(u, v), torch.outer(lam, c_inv_k)) <= 1e-6
    assert rel(u, lam) <= 1e-6 and rel(v, c_inv_k) <= 1e-6  # the same factors, not only the same product


@pytest.mark.parametrize("symmetric", [True, False])
def test_insert_holds_protected_keys_and_writes_the_edit(symmetric):
    d_out, d_in, m = 8, 16, 5
    g = torch.Generator().manual_seed(5)
    c = spd(d_in, 6)
    w = torch.randn(d_out, d_in, generator=g).double()
    k_star, v_star = torch.randn(d_in, generator=g), torch.randn(d_out, generator=g)
    k_d = k_star if symmetric else k_star + 0.3 * torch.randn(d_in, generator=g)
    protected = torch.randn(m, d_in, generator=g) + 0.5 * k_star  # correlated with k*: a rank-one edit moves them
    u, v = insert(Solver(c), k_star, v_star, k_d, (w @ k_d.double()).float(), protected)
    w_hat = w + torch.outer(u, v).double()
    assert rel(w_hat @ k_d.double(), v_star) < 1e-5
    for k in protected:
        assert rel(w_hat @ k.double(), w @ k.double()) < 1e-5
    if not symmetric:
        return
    for k in protected:
        assert rel(w_hat @ k.double(), w @ k.double()) < 1e-5
    # Still rank one, and the minimal-norm solution: Δ C lies in the span of K (Δ C = Λ' Kᵀ for some Λ').
    delta = torch.outer(u, v).double()
    keys = torch.cat([k_star[None], protected]).double()  # (m + 1, d_in)
    coef = torch.linalg.lstsq(keys.T, (delta @ c.double()).T).solution  # (m + 1, d_out)
    assert rel(keys.T @ coef, (delta @ c.double()).T) < 1e-6
    # Without protection the same keys move.
    u0, v0 = insert(Solver(c), k_star, v_star, k_star, (w @ k_star.double()).float())
    moved = torch.outer(u0, v0).double() @ protected.T.double()
    assert moved.norm() > 0.1 * torch.outer(u0, v0).double().norm()


def test_insert_many_writes_every_edit_and_holds_the_protected_keys():
    d_out, d_in, e, m = 8, 40, 6, 4
    g = torch.Generator().manual_seed(11)
    c = spd(d_in, 12)
    w = torch.randn(d_out, d_in, generator=g).double()
    keys, targets = torch.randn(e, d_in, generator=g), torch.randn(e, d_out, generator=g)
    protected = torch.randn(m, d_in, generator=g) + keys[:m]
    residuals = (targets.double() - keys.double() @ w.T).float()
    u, v = insert_many(Solver(c), keys, residuals, protected=protected)
    assert u.shape == (d_out, e) and v.shape == (d_in, e)
    w_hat = w + u.double() @ v.double().T
    for k, t in zip(keys, targets):
        assert rel(w_hat @ k.double(), t) < 1e-5
    for k in protected:
        assert rel(w_hat @ k.double(), w @ k.double()) < 1e-5
    assert torch.linalg.matrix_rank(u.double() @ v.double().T) == e
    # two edits of the same key cannot both hold
    with pytest.raises(InsertError, match="cannot be separated"):
        insert_many(Solver(c), torch.stack([keys[0], keys[0]]), residuals[:2], min_residual=0.01)


def test_insert_refuses_keys_it_cannot_separate():
    d_in = 12
    c = spd(d_in, 7)
    g = torch.Generator().manual_seed(8)
    k_star = torch.randn(d_in, generator=g)
    same = torch.stack([2.0 * k_star + 1e-4 * torch.randn(d_in, generator=g)])
    with pytest.raises(InsertError, match="cannot be separated"):
        insert(Solver(c), k_star, torch.randn(4, generator=g), k_star, torch.zeros(4), same, ridge=1e-6,
               min_residual=0.05)
    assert residual_share(Solver(c), k_star, same) < 1e-3
    assert residual_share(Solver(c), k_star, same[:0]) == 1.0


@pytest.mark.parametrize("model_type", ARCHS)
def test_protected_edit_on_every_architecture(tiny_lm, second_moment, model_type):
    """Ŵ k* = v* and Ŵ k_j = W k_j (prefix-averaged keys of the protected subjects) within 1e-4."""
    lm = tiny_lm(model_type)
    stats = second_moment(model_type)
    rome = Rome(lm, PARAMS, lambda layer: stats[layer])
    name = models.edited_module_name(lm.model, EDIT_LAYER)
    module = lm.model.get_submodule(name)
    result = rome.compute(CURIE)
    assert result.protected == ["Marie Curie", "Albert Einstein"]
    keys = torch.cat([rome.held_keys(EDIT_LAYER, s) for s in result.protected])  # bare and averaged keys
    with torch.no_grad():
        before = module(keys).clone()  # (m, d_out)
        models.weight_out_in(lm.model, name).add_(torch.outer(result.update.u, result.update.v))
        after, mapped = module(keys), module(result.k_star[None])[0]
    # float32 rounding of Ŵ = W + u vᵀ: measured up to 7.7e-6 relative over the architectures; 1e-4: a 13x margin
    assert rel(mapped, result.v_star) < 1e-4
    for b, a in zip(before, after):
        assert rel(a, b) < 1e-4


def test_only_the_protect_list_is_held_never_a_neighbour(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("edits:\n  - subject: Pierre Curie\n    relation: \"{}'s area of work is\"\n    target: medicine\n"
                    "    protect: [Jacques Curie]\n"
                    "    neighbors: [\"Marie Curie's area of work is\", {prompt: 'Einstein worked on', answer: physics}]\n")
    edit = load_manifest(path).edits[0]
    # only the protect list: a neighbour asked with the edit's own relation is test data, not a constraint
    assert edit.request.protect == ("Jacques Curie",)
    path.write_text("edits:\n  - subject: Pierre Curie\n    relation: \"{} worked in\"\n    target: medicine\n"
                    "    protect: [Pierre Curie]\n")
    with pytest.raises(ManifestError, match=r"edits\[0\]\.protect: lists the edited subject"):
        load_manifest(path)


# --------------------------------------------------------------------------------------------------
# Choosing protected subjects
# --------------------------------------------------------------------------------------------------


class WordTokenizer:
    """A word-level stand-in for a tokenizer: one id per distinct word, as the models' tokenizers
    give one last token per last word in these examples."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def _ids(self, text: str) -> list[int]:
        return [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]

    def __call__(self, texts):
        class Out:
            pass

        out = Out()
        out.input_ids = [self._ids(t) for t in texts] if isinstance(texts, list) else self._ids(texts)
        return out


def test_name_index_groups_names_by_last_token(tmp_path):
    (tmp_path / "names.txt").write_text("Harvard University\nYale University\nKensington Palace\n\nlowercase thing\n")
    (tmp_path / "facts.json").write_text(json.dumps([{"subject": "Princeton University"}, "Tower Bridge (London)"]))
    names = reference_names(("names.txt", "facts.json"), tmp_path)
    assert names == ["Harvard University", "Yale University", "Kensington Palace", "Princeton University", "Tower Bridge"]
    tok = WordTokenizer()
    index = NameIndex(tok, names)
    assert index.sharing(tok, "Stanford University") == ["Harvard University", "Yale University", "Princeton University"]
    assert index.sharing(tok, "Yale University") == ["Harvard University", "Princeton University"]
    assert index.sharing(tok, "Buckingham Palace") == ["Kensington Palace"]
    assert index.sharing(tok, "Golden Gate") == []


# --------------------------------------------------------------------------------------------------
# NS_tok: mining token-sharing neighbours
# --------------------------------------------------------------------------------------------------


def rec(case_id, subject, relation, new, true, relation_id=None):
    return CounterfactRecord(case_id, subject, relation, new, true, ("p",), ("n",), relation_id=relation_id)


def test_mining_finds_the_subjects_that_share_the_last_token():
    located = "{} is located in the state of"
    records = [rec(1, "Stanford University", located, "Texas", "California"),
               rec(2, "Harvard University", located, "Ohio", "Massachusetts"),
               rec(3, "Yale University", located, "Massachusetts", "Connecticut"),
               rec(4, "Duke University", "{} was founded by", "Gates", "Duke"),  # another relation
               rec(5, "Buckingham Palace", "{} is in", "Berlin", "London")]
    facts = [Fact("Princeton University", located, "New Jersey"), Fact("Texas University", located, "Texas")]
    mined = {r.case_id: r for r in mine_token_neighbors(records, WordTokenizer(), k=5, extra=facts)}
    got = {cid: sorted(n.subject for n in r.token_neighbors) for cid, r in mined.items()}
    # Stanford -> Texas: Texas University already answers Texas, so it is not a neighbour to keep
    assert got[1] == ["Harvard University", "Princeton University", "Yale University"]
    # Yale -> Massachusetts: Harvard's answer is the new target
    assert got[3] == ["Princeton University", "Stanford University", "Texas University"]
    assert got[4] == [] and got[5] == []
    n = {x.subject: x for x in mined[1].token_neighbors}
    assert n["Harvard University"].prompt == "Harvard University is located in the state of"
    assert n["Harvard University"].answer == "Massachusetts"
    # at most k, the same draw every time
    again = mine_token_neighbors(records, WordTokenizer(), k=2, extra=facts)
    assert len(again[0].token_neighbors) == 2
    assert again == mine_token_neighbors(records, WordTokenizer(), k=2, extra=facts)
    # relation ids (the paper's schema) match across templates
    a = rec(7, "Tower Bridge", "{} is located in", "Rome", "London", "P131")
    b = rec(8, "Brooklyn Bridge", "{}, which is located in", "Paris", "New York", "P131")
    got = mine_token_neighbors([a, b], WordTokenizer(), k=5)
    assert [x.prompt for x in got[0].token_neighbors] == ["Brooklyn Bridge is located in"]


def test_s_plus_averages_ns_tok_over_the_records_that_have_it():
    es, ps, ns = [100, 100, 100, 100], [100, 50, 100, 50], [100, 100, 0, 100]
    tok = [50, math.nan, 100, math.nan]  # records 2 and 4 have no token-sharing neighbour
    s_plus = score_ci(es, ps, ns, 200, extra=[tok])
    means = [100, 75, 75, 75]
    assert s_plus.value == pytest.approx(4 / sum(1 / m for m in means))
    assert s_plus.low <= s_plus.value <= s_plus.high
    s = score_ci(es, ps, ns, 200)
    assert s.value == pytest.approx(3 / (1 / 100 + 1 / 75 + 1 / 75))


@pytest.mark.parametrize("model_type", ["gpt2", "gemma3_text"])
def test_prompt_key_gives_the_prompts_own_key_the_edits_change(tiny_lm, second_moment, model_type, tmp_path,
                                                                monkeypatch):
    """prompt_key: Ŵ k* = v* and Ŵ k_p = W k_p + (v* − W k*) for the rewrite prompt's own key k_p, in a
    rank-one update (symmetric keys); without symmetric keys a rank-2 update, saved and loaded as (d, 2)
    factors, that composes like any delta."""
    from romeflow.pipeline.compose import EditedModel
    from romeflow.pipeline.deltas import compute_delta, load_delta, save_delta
    from romeflow.pipeline.manifests import Manifest, ManifestEdit
    from romeflow.engine.rome import subject_keys

    lm = tiny_lm(model_type)
    stats = second_moment(model_type)
    request = replace(CURIE, relation="In Paris, {} worked in the field of", protect=())
    name = models.edited_module_name(lm.model, EDIT_LAYER)
    module = lm.model.get_submodule(name)
    k_p = subject_keys(lm, EDIT_LAYER, [request.relation], request.subject)[0]
    for symmetric in (True, False):
        monkeypatch.setitem(inserts.INSERTS, "pk", InsertSpec(prompt_key=True, min_residual=1e-3))
        params = replace(PARAMS, insert="pk", symmetric_keys=symmetric)
        result = Rome(lm, params, lambda layer: stats[layer]).compute(request)
        u, v = result.update.u, result.update.v
        assert u.dim() == (1 if symmetric else 2)
        dw = torch.outer(u, v) if symmetric else u @ v.T
        with torch.no_grad():
            before_p, delta = module(k_p[None])[0].clone(), result.v_star - module(result.k_star[None])[0]
            models.weight_out_in(lm.model, name).add_(dw)
            if symmetric:
                assert rel(module(result.k_star[None])[0], result.v_star) < 1e-5
            assert rel(module(k_p[None])[0], before_p + delta) < 1e-5
            models.weight_out_in(lm.model, name).sub_(dw)

    class _Stats:
        def __init__(self, c):
            self.second_moment, self.sha256 = c, "0" * 64
            self.meta = {"corpus_id": "tiny", "corpus_sha256": "0" * 64, "tokens": 1}

    edit = ManifestEdit(request.subject, request.relation, request.target, request.target_true)
    manifest = Manifest(str(tmp_path / "m.yaml"), "m", "0" * 64, (edit,))
    delta = compute_delta(lm, manifest, params, {EDIT_LAYER: _Stats(stats[EDIT_LAYER])})  # not symmetric: rank 2
    assert delta.meta["edits"][0]["rank"] == 2
    save_delta(tmp_path / "m.safetensors", delta)
    loaded = load_delta(tmp_path / "m.safetensors")
    assert loaded.updates[0].u.shape == (u.shape[0], 2)
    edited = EditedModel(lm)
    base = models.weight_out_in(lm.model, name).clone()
    edited.compose([loaded])
    torch.testing.assert_close(models.weight_out_in(lm.model, name) - base, loaded.updates[0].u @ loaded.updates[0].v.T,
                               rtol=1e-4, atol=1e-6)
    edited.reset()
    assert torch.equal(models.weight_out_in(lm.model, name), base)


@pytest.mark.parametrize("model_type", ARCHS)
def test_prefix_keys_give_every_context_key_the_edits_change(tiny_lm, second_moment, model_type):
    """prefix_keys: Ŵ k_i = W k_i + δ at every context prefix's key (and the prompt's), so Ŵ k* = v* too
    (k* is their mean), with the protected subjects' keys held fixed, in one rank-one update."""
    from romeflow.engine.rome import subject_keys

    lm = tiny_lm(model_type)
    stats = second_moment(model_type)
    request = replace(CURIE, relation="In Paris, {} worked in the field of")
    rome = rome_with(lm, stats, InsertSpec(prefix_keys=True, prompt_key=True, min_residual=1e-3, ridge=1e-9))
    name = models.edited_module_name(lm.model, EDIT_LAYER)
    result = rome.compute(request)
    assert result.update.u.dim() == 1  # rank one
    context = torch.cat([subject_keys(lm, EDIT_LAYER, [x + "{}" for x in rome.prefixes], request.subject),
                         subject_keys(lm, EDIT_LAYER, [request.relation], request.subject)])  # (P + 1, d_in)
    held = torch.cat([rome.held_keys(EDIT_LAYER, s) for s in result.protected]).double()
    w = models.weight_out_in(lm.model, name).detach().double()  # (d_out, d_in); compared in float64
    w_hat = w + torch.outer(result.update.u, result.update.v).double()
    context, k_star = context.double(), result.k_star.double()
    delta = result.v_star.double() - w @ k_star  # δ = v* − W k*
    assert rel(w_hat @ k_star, result.v_star) < 1e-5
    for k in context:
        assert rel(w_hat @ k, w @ k + delta) < 1e-5
    for k in held:
        assert rel(w_hat @ k, w @ k) < 1e-5


@pytest.mark.parametrize("model_type", ARCHS)
def test_family_centroid_holds_the_familys_mean_key(tiny_lm, second_moment, model_type, monkeypatch):
    """centroid: Ŵ k̄ = W k̄ for the mean bare key of the subject's family, with Ŵ k* = v*; the
    delta's protected keys are the protected subjects' own (two a subject), then k̄ (the stack holds it)."""
    lm = tiny_lm(model_type)
    stats = second_moment(model_type)
    members = ["Jacques Curie", "Eve Curie", "Irene Curie"]
    rome = rome_with(lm, stats, InsertSpec(centroid=True, prefix_keys=True, min_residual=1e-3, ridge=1e-9))
    monkeypatch.setattr(inserts, "family", lambda _rome, subject: members + [subject])  # the subject itself is left out
    name = models.edited_module_name(lm.model, EDIT_LAYER)
    result = rome.compute(CURIE)
    assert result.family["centroid"] is True
    centroid = rome.bare_keys(EDIT_LAYER, members).mean(0).double()
    assert result.protected_keys.shape[0] == 2 * len(result.protected) + 1  # the subjects', then the centroid
    assert rel(result.protected_keys[-1], centroid) < 1e-6
    w = models.weight_out_in(lm.model, name).detach().double()
    w_hat = w + torch.outer(result.update.u, result.update.v).double()
    assert rel(w_hat @ result.k_star.double(), result.v_star) < 1e-5
    assert rel(w_hat @ centroid, w @ centroid) < 1e-5
    for k in result.protected_keys.double():
        assert rel(w_hat @ k, w @ k) < 1e-5
    # without a family there is nothing to hold
    monkeypatch.setattr(inserts, "family", lambda _rome, subject: [])
    assert rome.compute(CURIE).family["centroid"] is False


def test_prefix_keys_without_symmetric_keys_keep_the_papers_constraint_at_the_bare_key(tiny_lm, second_moment):
    """With the paper's asymmetric keys, the bare prompt's key k_d maps to v* and every other context key
    gets δ = v* − W k*: a rank-2 update."""
    from romeflow.engine.rome import subject_keys

    lm = tiny_lm("gemma3_text")
    stats = second_moment("gemma3_text")
    request = replace(CURIE, protect=())
    rome = rome_with(lm, stats, InsertSpec(prefix_keys=True, ridge=1e-9), replace(PARAMS, symmetric_keys=False))
    name = models.edited_module_name(lm.model, EDIT_LAYER)
    result = rome.compute(request)
    u, v = result.update.u.double(), result.update.v.double()
    assert u.shape[1] == v.shape[1] == 2
    context = subject_keys(lm, EDIT_LAYER, [x + "{}" for x in rome.prefixes], request.subject).double()
    w = models.weight_out_in(lm.model, name).detach().double()
    w_hat = w + u @ v.T
    delta = result.v_star.double() - w @ result.k_star.double()
    assert rel(w_hat @ context[0], result.v_star) < 1e-5  # row 0: the bare prompt, the paper's k_d
    for k in context[1:]:
        assert rel(w_hat @ k, w @ k + delta) < 1e-5


def test_one_word_subjects_get_no_made_up_siblings_and_the_family_term_is_bounded(tiny_lm, second_moment):
    lm = tiny_lm("gpt2")
    stats = second_moment("gpt2")
    spec = InsertSpec(family_weight=1.0, siblings=8)
    rome = rome_with(lm, stats, spec)
    assert all(" " in s for s in family(rome, "Pierre Curie")[-8:])  # made-up "X Curie" siblings
    assert family(rome, "Seattle") == rome.names().sharing(lm.tokenizer, "Seattle")[:256]  # none made up
    # The family term spends at most max_energy x the text energy of the insert without it.
    plain = rome_with(lm, stats, replace(spec, family_weight=0.0)).compute(CURIE)
    wide = rome_with(lm, stats, replace(spec, max_energy=1e6)).compute(CURIE)
    assert wide.family["alpha"] == 1.0 and wide.family["energy_ratio"] > 1.0
    assert not torch.allclose(torch.outer(wide.update.u, wide.update.v), torch.outer(plain.update.u, plain.update.v))
    e_plain = text_energy(stats[1], plain.update.u, plain.update.v)
    assert text_energy(stats[1], wide.update.u, wide.update.v) == pytest.approx(wide.family["energy_ratio"] * e_plain)
    budget = (1 + wide.family["energy_ratio"]) / 2  # below the full α's ratio: α is halved until it fits
    halved = rome_with(lm, stats, replace(spec, max_energy=budget)).compute(CURIE)
    assert halved.family["alpha"] < 1.0 and halved.family["energy_ratio"] <= budget
    # Eq. 2's own update is the least-energy one: a budget of 1 leaves no room for the family term.
    guarded = rome_with(lm, stats, replace(spec, max_energy=1.0)).compute(CURIE)
    assert guarded.family == {"alpha": 0.0, "energy_ratio": 1.0}
    torch.testing.assert_close(torch.outer(guarded.update.u, guarded.update.v),
                               torch.outer(plain.update.u, plain.update.v), rtol=1e-4, atol=1e-6)


def test_text_energy_is_the_mean_squared_change_over_the_keys():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(500, 6, generator=g, dtype=torch.float64)  # (n, d_in)
    c = keys.T @ keys / len(keys)  # (d_in, d_in)
    u, v = torch.randn(4, 2, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    change = keys @ v @ u.T  # (n, d_out): Δk for every key
    assert text_energy(c, u, v) == pytest.approx(change.pow(2).sum(1).mean().item(), rel=1e-9)
    assert text_energy(c, u[:, 0], v[:, 0]) == pytest.approx((keys @ v[:, 0]).pow(2).mean().item() * u[:, 0].pow(2).sum().item())


@pytest.mark.parametrize("f", [1, 5, 40])
def test_woodbury_solver_is_the_dense_solve_of_c_plus_alpha_b_bt(f):
    """The family term's (C + α B Bᵀ)⁻¹ by the Woodbury identity equals factorising the sum itself."""
    g = torch.Generator().manual_seed(f)
    c = spd(24, seed=f).double()
    b = torch.randn(24, f, generator=g, dtype=torch.float64)
    base = Solver(c)
    shared = None
    for alpha in (1.0, 0.25, 1e-3):  # the halvings share C⁻¹B
        solver = WoodburySolver(base, b, alpha, shared)
        shared = solver.c_inv_b
        dense = Solver(c + alpha * b @ b.T)
        k = torch.randn(24, 3, generator=g, dtype=torch.float64)
        assert rel(solver.solve64(k), dense.solve64(k)) < 1e-10
        assert rel(solver.solve64(k[:, 0]), dense.solve64(k[:, 0])) < 1e-10
        assert solver(k.float()).dtype == torch.float32


def test_memo_solver_answers_repeated_keys_once_and_like_the_solver():
    c = spd(16, seed=3).double()
    base = Solver(c)
    calls = []
    real = base.solve64
    base.solve64 = lambda k: calls.append(1) or real(k)
    memo = MemoSolver(base)
    k = torch.randn(16, 2, dtype=torch.float64)
    first = memo.solve64(k)
    assert torch.equal(memo.solve64(k.clone()), first) and len(calls) == 1  # by content, not identity
    assert rel(memo.solve64(k + 1e-9), real(k + 1e-9)) < 1e-12 and len(calls) == 2
    assert rel(first, torch.linalg.solve(c, k)) < 1e-10

