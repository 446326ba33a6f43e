"""The joint stack solve (stack.method: joint) and sequential editing: deltas store each edit's (k*, v*),
the stack is re-solved from all of them at once, later edits hold earlier edits' keys fixed."""

from __future__ import annotations

import hashlib

import pytest
import torch

from romeflow.engine import models
from romeflow.pipeline.deltas import DeltaError, compute_delta, load_delta, save_delta
from romeflow.pipeline.compose import EditedModel, JointSolve
from romeflow.pipeline.manifests import Manifest, ManifestEdit, ManifestError, check_conflicts
from romeflow.engine.joint import joint_insert, null_space_basis, projected_solver
from romeflow.engine.rome import InsertError, RomeParams, Solver
from romeflow.engine.statistics import Stats

from conftest import EDIT_LAYER

PARAMS = RomeParams(layer=EDIT_LAYER, prefix_lengths=(3,), prefixes_per_length=2, steps=4, seed=0, lr=0.1,
                    weight_decay=0.0, kl_factor=0.0)
FIRST = ["Anna", "Boris", "Clara", "Dmitri", "Elena", "Felix", "Greta", "Hugo", "Irene", "Jonas"]
LAST = ["Brandt", "Castell", "Dorn", "Ekland", "Falk"]
TARGETS = ["Paris", "Seattle", "Rome", "London", "Italy", "France", "Germany", "physics", "medicine", "music"]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def one_edit_manifest(name: str, subject: str, target: str, relation: str = "{} lives in",
                      protect: tuple[str, ...] = ()) -> Manifest:
    e = ManifestEdit(subject, relation, target, protect=protect)
    return Manifest(f"edits/{name}.yaml", name, hashlib.sha256(name.encode()).hexdigest(), (e,))


@pytest.fixture(scope="module")
def setup(tiny_lm, second_moment):
    lm = tiny_lm("gpt2")
    c = second_moment("gpt2")[EDIT_LAYER]
    stats = {EDIT_LAYER: Stats(c, {"corpus_id": "tiny", "corpus_sha256": "0" * 64, "tokens": 4000}, "1" * 64)}
    return lm, stats, c


@pytest.fixture(scope="module")
def fifty(setup):
    """50 one-edit deltas of 50 different subjects, each computed on the base model."""
    lm, stats, _ = setup
    subjects = [f"{f} {l}" for l in LAST for f in FIRST]
    return [compute_delta(lm, one_edit_manifest(f"m{i}", s, TARGETS[i % len(TARGETS)]), PARAMS, stats)
            for i, s in enumerate(subjects)]


def module_of(lm):
    return lm.model.get_submodule(models.edited_module_name(lm.model, EDIT_LAYER))


def test_a_delta_stores_k_star_and_v_star_and_they_are_checked_on_load(tmp_path, setup):
    lm, stats, _ = setup
    d = compute_delta(lm, one_edit_manifest("a", "Pierre Curie", "medicine", protect=("Marie Curie",)), PARAMS, stats)
    save_delta(tmp_path / "a.safetensors", d)
    back = load_delta(tmp_path / "a.safetensors")
    assert back.meta["key_values"] is True and back.meta["edits"][0]["protected_keys"] == 2
    kv = back.pairs[0]
    assert kv.k_star.dtype == torch.float32 and kv.k_star.shape == (lm.model.config.n_inner,)
    assert torch.equal(kv.k_star, d.pairs[0].k_star) and torch.equal(kv.v_star, d.pairs[0].v_star)
    assert kv.protected.shape == (2, kv.k_star.numel())
    # the pair is the edit's own: the delta alone maps k* to v*
    edited = EditedModel(lm)
    edited.compose([back])
    with torch.no_grad():
        # Ŵk* = v* up to float32 rounding of Ŵ = W + u vᵀ (measured 1.8e-6): 1e-4, a > 50x margin
        assert rel_err(module_of(lm)(kv.k_star[None])[0], kv.v_star) < 1e-4
    edited.reset()


def test_joint_equals_sum_for_one_delta(setup):
    lm, stats, c = setup
    name = models.edited_module_name(lm.model, EDIT_LAYER)
    for protect in ((), ("Marie Curie",)):
        d = compute_delta(lm, one_edit_manifest("a", "Pierre Curie", "medicine", protect=protect), PARAMS, stats)
        edited = EditedModel(lm)
        edited.compose([d])
        w_sum = models.weight_out_in(lm.model, name).clone()
        edited.compose([d], JointSolve(lambda layer: c))
        w_joint = models.weight_out_in(lm.model, name).clone()
        edited.reset()
        base = models.weight_out_in(lm.model, name)
        # one ΔW by two float paths (the delta's own u vᵀ vs a float64 re-solve), read back as float32 Ŵ − W:
        # measured 3.8e-6 relative; 1e-4 leaves a 25x margin
        assert rel_err(w_joint - base, w_sum - base) <= 1e-4, protect


def test_joint_satisfies_every_edit_of_fifty(setup, fifty):
    lm, _, c = setup
    edited = EditedModel(lm)
    edited.compose(fifty, JointSolve(lambda layer: c))
    module = module_of(lm)
    with torch.no_grad():
        errors = [rel_err(module(d.pairs[0].k_star[None])[0], d.pairs[0].v_star) for d in fifty]
    # the sum of the same deltas does not: each one's update moves the other keys
    edited.compose(fifty)
    with torch.no_grad():
        summed = [rel_err(module(d.pairs[0].k_star[None])[0], d.pairs[0].v_star) for d in fifty]
    edited.reset()
    # float32 rounding of a Ŵ that carries 50 edits: measured 7.4e-6 relative; 1e-4 leaves a 13x margin
    assert max(errors) <= 1e-4, max(errors)
    assert max(summed) > 1e-2


def test_dropping_a_manifest_and_re_solving_equals_a_fresh_solve(setup, fifty, tiny_lm):
    lm, _, c = setup
    name = models.edited_module_name(lm.model, EDIT_LAYER)
    chosen = fifty[:6]
    dropped = chosen[:2] + chosen[3:]
    edited = EditedModel(lm)
    solve = JointSolve(lambda layer: c)
    edited.compose(chosen, solve)
    w_all = models.weight_out_in(lm.model, name).clone()
    edited.compose(dropped, solve)  # re-solve on the same model, after composing all six
    w_dropped = models.weight_out_in(lm.model, name).clone()
    edited.reset()
    fresh_lm = tiny_lm("gpt2")
    EditedModel(fresh_lm).compose(dropped, JointSolve(lambda layer: c))
    assert torch.equal(w_dropped, models.weight_out_in(fresh_lm.model, name))
    assert not torch.equal(w_all, w_dropped)
    module = module_of(fresh_lm)
    with torch.no_grad():
        assert all(rel_err(module(d.pairs[0].k_star[None])[0], d.pairs[0].v_star) < 1e-5 for d in dropped)
        gone = chosen[2].pairs[0]
        assert rel_err(module(gone.k_star[None])[0], gone.v_star) > 1e-3  # its edit is no longer there


def test_joint_refuses_a_delta_without_pairs(setup, fifty, tmp_path):
    lm, _, c = setup
    old = fifty[0]
    old = type(old)(old.updates, {k: v for k, v in old.meta.items() if k != "key_values"}, "deltas/old.safetensors")
    with pytest.raises(DeltaError) as e:
        EditedModel(lm).compose([fifty[1], old], JointSolve(lambda layer: c))
    assert "deltas/old.safetensors: key_values:" in str(e.value) and "\n" not in str(e.value)
    edited = EditedModel(lm)
    edited.compose([fifty[1], old])  # the sum still takes it
    edited.reset()


def test_joint_same_key_twice_is_refused_exactly_and_relaxed_by_the_ridge(setup, fifty):
    """Two edits of one subject with different relations share k*: no exact solve exists; the ridge gives the
    least-squares one (each edit half-way)."""
    lm, stats, c = setup
    a = compute_delta(lm, one_edit_manifest("x", "Anna Brandt", "Rome", "{} was born in"), PARAMS, stats)
    with pytest.raises(DeltaError) as e:
        EditedModel(lm).compose([fifty[0], a], JointSolve(lambda layer: c))
    assert "cannot separate" in str(e.value) and "stack.ridge" in str(e.value)
    edited = EditedModel(lm)
    edited.compose([fifty[0], a], JointSolve(lambda layer: c, ridge=1e-3))
    with torch.no_grad():
        out = module_of(lm)(a.pairs[0].k_star[None])[0]
    edited.reset()
    middle = (a.pairs[0].v_star + fifty[0].pairs[0].v_star) / 2
    assert rel_err(out, middle) < 1e-2


def test_null_space_projection_leaves_the_preserved_directions_alone(setup, fifty):
    lm, _, c = setup
    basis = null_space_basis(c, 0.05)
    q = basis.shape[1]
    assert 0 < q < c.shape[0]
    keys = torch.stack([d.pairs[0].k_star for d in fifty[:5]])
    values = torch.stack([d.pairs[0].v_star for d in fifty[:5]])
    w = models.weight_out_in(lm.model, models.edited_module_name(lm.model, EDIT_LAYER)).clone()
    u, v = joint_insert(projected_solver(c, basis), w, keys, values, basis=basis)
    delta = (u.double() @ v.double().T)  # (d_out, d_in)
    evals, evecs = torch.linalg.eigh(c.double())
    preserved = evecs[:, evals >= 0.05 * evals[-1]]  # Û
    assert float((delta @ preserved).norm() / delta.norm()) < 1e-6  # Δ Û = 0
    assert rel_err((w.double() + delta) @ keys.double().T, values.double().T) < 1e-5  # the edits still hold
    # Without the projection the update does touch Û
    u0, v0 = joint_insert(Solver(c), w, keys, values)
    assert float(((u0.double() @ v0.double().T) @ preserved).norm()) > 1e-3


def test_joint_insert_raises_insert_error_naming_the_key(setup):
    lm, _, c = setup
    w = models.weight_out_in(lm.model, models.edited_module_name(lm.model, EDIT_LAYER))
    k = torch.randn(3, c.shape[0], generator=torch.Generator().manual_seed(0))
    keys = torch.cat([k, k[1:2]])  # key 3 = key 1
    with pytest.raises(InsertError) as e:
        joint_insert(Solver(c), w, keys, torch.randn(4, w.shape[0]))
    assert e.value.index in (1, 3)


def test_conflicting_manifests_are_refused_naming_both_files():
    a = one_edit_manifest("a", "Pierre Curie", "medicine")
    b = one_edit_manifest("b", "Anna Brandt", "Rome")
    c = one_edit_manifest("c", "Pierre Curie", "law")
    same = one_edit_manifest("d", "Pierre Curie", "medicine")
    other_relation = one_edit_manifest("e", "Pierre Curie", "law", "{} was born in")
    check_conflicts([a, b, same, other_relation])  # the same fact twice, or another relation: no conflict
    with pytest.raises(ManifestError) as e:
        check_conflicts([a, b, c])
    msg = str(e.value)
    assert msg.startswith("edits/c.yaml: edits[0].target: conflicts with edits/a.yaml") and "\n" not in msg


# --------------------------------------------------------------------------------------------------
# Sequential editing
# --------------------------------------------------------------------------------------------------


def test_a_manifests_later_edits_do_not_undo_its_earlier_ones(setup):
    lm, stats, _ = setup
    edits = tuple(ManifestEdit(f"{f} {l}", "{} lives in", t) for f, l, t in zip(FIRST, LAST, TARGETS))
    m = Manifest("edits/seq.yaml", "seq", "0" * 64, edits)
    d = compute_delta(lm, m, PARAMS, stats)
    assert [e.get("held", 0) for e in d.meta["edits"]] == list(range(len(LAST)))
    edited = EditedModel(lm)
    edited.compose([d])
    module = module_of(lm)
    with torch.no_grad():
        errors = [rel_err(module(kv.k_star[None])[0], kv.v_star) for kv in d.pairs]
    edited.reset()
    assert max(errors) < 1e-5, errors  # float32 rounding of Ŵ: ≤ 1.1e-6 measured


def test_apply_onto_a_stack_keeps_the_stack_s_edits(setup):
    """`romeflow apply --onto`: a stack built one manifest at a time, each applied onto the ones before, keeps
    every edit (Ŵ k_i = v_i for all of them under the plain sum), which the same deltas each computed on the
    base model do not."""
    lm, stats, _ = setup
    stack = []
    for i, (subject, target) in enumerate([("Anna Brandt", "Rome"), ("Boris Castell", "Paris"), ("Clara Dorn", "music")]):
        stack.append(compute_delta(lm, one_edit_manifest(f"m{i}", subject, target), PARAMS, stats, onto=list(stack)))
    new = compute_delta(lm, one_edit_manifest("n", "Hugo Falk", "Paris"), PARAMS, stats, onto=stack)
    assert new.meta["edits"][0]["held"] == 3
    assert [o["manifest"] for o in new.meta["onto"]] == ["m0", "m1", "m2"]
    edited = EditedModel(lm)
    edited.compose(stack + [new])  # the sum: stack + the new delta
    module = module_of(lm)
    with torch.no_grad():
        errors = [rel_err(module(d.pairs[0].k_star[None])[0], d.pairs[0].v_star) for d in stack + [new]]
    edited.reset()
    assert max(errors) < 1e-5, errors  # float32 rounding of Ŵ: ≤ 1e-6 measured
    # without --onto the new delta's update moves the stack's keys
    plain = compute_delta(lm, one_edit_manifest("n", "Hugo Falk", "Paris"), PARAMS, stats)
    edited.compose(stack + [plain])
    with torch.no_grad():
        moved = [rel_err(module(d.pairs[0].k_star[None])[0], d.pairs[0].v_star) for d in stack]
    edited.reset()
    assert max(moved) > 1e-4


def test_joint_shared_protection_and_an_edit_of_a_protected_subject(setup):
    """Two edits protecting the same subject: one constraint, not a refusal. A third manifest editing that
    subject: its edit wins over the others' protection. Every edit holds exactly."""
    lm, stats, c = setup
    a = compute_delta(lm, one_edit_manifest("a", "Pierre Curie", "medicine", protect=("Marie Curie",)), PARAMS, stats)
    b = compute_delta(lm, one_edit_manifest("b", "Irene Curie", "music", protect=("Marie Curie",)), PARAMS, stats)
    marie = compute_delta(lm, one_edit_manifest("m", "Marie Curie", "Rome"), PARAMS, stats)
    module = module_of(lm)
    for stack in ([a, b], [a, b, marie]):
        edited = EditedModel(lm)
        edited.compose(stack, JointSolve(lambda layer: c))
        with torch.no_grad():
            errors = [rel_err(module(d.pairs[0].k_star[None])[0], d.pairs[0].v_star) for d in stack]
            protected = a.pairs[0].protected  # Marie Curie's keys: unchanged unless she is edited
            moved = rel_err(module(protected), EditedModel_base(lm, edited, protected))
        edited.reset()
        assert max(errors) < 1e-5, (len(stack), errors)
        assert (moved < 1e-5) == (len(stack) == 2), moved


def EditedModel_base(lm, edited, keys):
    """The base module's output for keys, from the weights the EditedModel saved."""
    name = models.edited_module_name(lm.model, EDIT_LAYER)
    w = edited._base[name]
    out = keys @ w.T
    bias = getattr(lm.model.get_submodule(name), "bias", None)
    return out + bias if bias is not None else out


# --------------------------------------------------------------------------------------------------
# The calibrated stack (stack.margin): each edit at the least share of its change that holds
# --------------------------------------------------------------------------------------------------


STRONG = RomeParams(layer=EDIT_LAYER, prefix_lengths=(3,), prefixes_per_length=2, steps=25, seed=0, lr=0.3,
                    weight_decay=0.0, kl_factor=0.0, early_stop_nll=0.0, clamp_norm_factor=100.0)


@pytest.fixture(scope="module")
def strong(setup):
    """8 one-edit deltas whose edits take on the tiny model (margins of nats, not hundredths)."""
    lm, stats, _ = setup
    subjects = [f"{f} {l}" for l in LAST[:2] for f in FIRST[:4]]
    out = []
    for i, subject in enumerate(subjects):
        e = ManifestEdit(subject, "{} lives in", TARGETS[i], target_true=TARGETS[(i + 5) % len(TARGETS)])
        m = Manifest(f"edits/s{i}.yaml", f"s{i}", hashlib.sha256(f"s{i}".encode()).hexdigest(), (e,))
        out.append(compute_delta(lm, m, STRONG, stats))
    return out


def _rewrites(deltas):
    canon = [d.meta["manifest"]["canonical"]["edits"][0] for d in deltas]
    return [e["relation"].replace("{}", e["subject"]) for e in canon], [e["target"] for e in canon]


def _olds(deltas):
    return [d.meta["manifest"]["canonical"]["edits"][0]["target_true"] for d in deltas]


def test_calibrating_one_delta_is_the_single_edit_bisection(setup, strong):
    from romeflow.engine.margins import least_scale, margin_under

    lm, _, c = setup
    for d in strong:  # the first whose edit takes against the base model's own answer
        (prompt,), (target,) = _rewrites([d])
        (old,) = _olds([d])
        up = d.updates[0]
        w0 = models.read_weight(lm.model, up.module)
        whole = margin_under(lm, up.module, up.u, up.v, prompt, target, old)(1.0)
        models.write_weight(lm.model, up.module, w0)
        if whole > 0.1:
            break
    assert whole > 0.1
    want = least_scale(margin_under(lm, up.module, up.u, up.v, prompt, target, old), whole / 2, 6)
    models.write_weight(lm.model, up.module, w0)
    assert 0 < want < 1

    edited = EditedModel(lm)
    edited.compose([d], JointSolve(lambda layer: c, margin=whole / 2, rounds=6))
    w_cal = models.read_weight(lm.model, up.module)
    edited.reset()
    assert edited.scales is None and torch.equal(models.read_weight(lm.model, up.module), w0)
    edited.compose([d], JointSolve(lambda layer: c, margin=whole / 2, rounds=6))
    assert edited.scales.tolist() == [want]
    # the calibrated stack is the delta scaled by that share
    torch.testing.assert_close((w_cal - w0).double(), want * torch.outer(up.u, up.v).double(), rtol=1e-4, atol=1e-6)
    edited.reset()


def test_a_calibrated_stack_is_the_joint_solve_of_its_scaled_edits(setup, strong):
    from romeflow.engine.margins import margins

    lm, _, c = setup
    prompts, targets = _rewrites(strong)
    olds = _olds(strong)
    name = models.edited_module_name(lm.model, EDIT_LAYER)
    w0 = models.read_weight(lm.model, name)
    edited = EditedModel(lm)
    plain = JointSolve(lambda layer: c)
    edited.compose(strong, plain)
    whole = margins(lm, prompts, targets, olds)
    w_whole = models.read_weight(lm.model, name)
    target = float(whole[whole > 0].median()) / 2
    assert target > 0

    edited.compose(strong, JointSolve(lambda layer: c, margin=target, rounds=5))
    s = edited.scales
    w_cal = models.read_weight(lm.model, name)
    assert s.shape == (len(strong),) and bool(((s > 0) & (s <= 1)).all())
    assert all(float(x) * 32 == int(float(x) * 32) for x in s)  # midpoints of 5 halvings
    assert bool((s < 1).any())
    assert (w_cal - w0).norm() < (w_whole - w0).norm()
    # what was written is the joint solve with each edit's residual scaled by its share
    (up,) = plain.updates(strong, {name: w0}, s)
    # float32 Ŵ vs the float64 sum: rounding is relative to the largest entries (~38 here, 2.9e-6 measured), so
    # the floor is 1e-6 of the largest entry
    torch.testing.assert_close(w_cal.double(), w0.double() + up.u.double() @ up.v.double().T, rtol=1e-5,
                               atol=1e-6 * float(w_cal.abs().max()))
    # a margin no edit reaches keeps every edit whole: the plain joint solve
    edited.compose(strong, JointSolve(lambda layer: c, margin=100.0, rounds=3))
    assert edited.scales.tolist() == [1.0] * len(strong)
    torch.testing.assert_close(models.read_weight(lm.model, name), w_whole)
    edited.reset()


def test_calibration_prompts_are_the_rewrite_and_evenly_spaced_v_star_prefixes():
    from romeflow.pipeline.deltas import Delta, calibration_prompts

    d = Delta([], {"context_prefixes": [""] + [f"P{i}. " for i in range(10)]})
    assert calibration_prompts(d, "X lives in", 0) == ["X lives in"]
    assert calibration_prompts(d, "X lives in", 4) == ["X lives in", "P0. X lives in", "P3. X lives in",
                                                       "P6. X lives in", "P9. X lives in"]
    assert calibration_prompts(d, "X lives in", 1) == ["X lives in", "P0. X lives in"]
    assert len(calibration_prompts(d, "X lives in", 50)) == 11
    assert calibration_prompts(Delta([], {}), "X lives in", 3) == ["X lives in"]


def test_protected_rows_keep_the_family_centroid_and_drop_subjects_the_stack_edits():
    """A delta's protected keys are two rows a protected subject, then the family's mean key when the
    insert held it (edits[i].centroid): the joint solve drops the rows of a subject another edit of the
    stack rewrites, never the centroid's."""
    from types import SimpleNamespace

    from romeflow.pipeline.deltas import KeyValue

    rows = torch.arange(5 * 3, dtype=torch.float32).reshape(5, 3)  # Marie (2), Albert (2), centroid
    kv = KeyValue("m", 1, torch.zeros(3), torch.zeros(2), rows)
    delta = SimpleNamespace(meta={"edits": [{"protected": ["Marie Curie", "Albert Einstein"], "centroid": True}]})
    kept = JointSolve.protected_rows(delta, 0, kv, {"Marie Curie"})
    assert torch.equal(kept, rows[2:])
    assert torch.equal(JointSolve.protected_rows(delta, 0, kv, set()), rows)
    delta.meta["edits"][0]["protected"] = ["Marie Curie"]  # rows that do not match the names: all kept
    assert torch.equal(JointSolve.protected_rows(delta, 0, kv, {"Marie Curie"}), rows)


@pytest.mark.parametrize("margin", [0.0, 1.0])
def test_revert_after_a_multi_layer_stack_equals_a_fresh_solve_of_what_remains(tiny_lm, second_moment, margin):
    """Deltas at every layer of the tiny model (one joint solve per edited module); dropping one re-solves only
    from what remains: the same weights, bit for bit, as a fresh model composing the remaining deltas, and a
    layer left with no delta is its base weight again. With the calibration (margin > 0) too, whose shares
    are found on the composed model of every layer at once."""
    lm = tiny_lm("gpt2")
    cs = second_moment("gpt2")
    meta = {"corpus_id": "tiny", "corpus_sha256": "0" * 64, "tokens": 4000}
    deltas = []
    for layer in range(3):
        stats = {layer: Stats(cs[layer], meta, f"{layer}" * 64)}
        params = RomeParams(layer=layer, prefix_lengths=(3,), prefixes_per_length=2, steps=4, seed=0, lr=0.1,
                            weight_decay=0.0, kl_factor=0.0)
        for j, subject in enumerate([f"{FIRST[2 * layer]} Brandt", f"{FIRST[2 * layer + 1]} Dorn"]):
            deltas.append(compute_delta(lm, one_edit_manifest(f"l{layer}m{j}", subject, TARGETS[2 * layer + j]),
                                        params, stats))
    names = [models.edited_module_name(lm.model, layer) for layer in range(3)]
    base = {n: models.weight_out_in(lm.model, n).clone() for n in names}

    def solve():
        return JointSolve(lambda layer: cs[layer], margin=margin, rounds=3)

    edited = EditedModel(lm, solve())
    edited.compose(deltas)
    every = {n: models.weight_out_in(lm.model, n).clone() for n in names}
    assert all(not torch.equal(every[n], base[n]) for n in names)  # each layer carries its own joint update
    remaining = deltas[:1] + deltas[2:4]  # one of layer 0's dropped, both of layer 2's
    edited.compose(remaining)
    reverted = {n: models.weight_out_in(lm.model, n).clone() for n in names}
    edited.reset()
    fresh = tiny_lm("gpt2")
    EditedModel(fresh, solve()).compose(remaining)
    for n in names:
        assert torch.equal(reverted[n], models.weight_out_in(fresh.model, n)), n
    assert torch.equal(reverted[names[2]], base[names[2]])  # no delta left there: the base weight, exactly
    assert not torch.equal(reverted[names[0]], every[names[0]])  # layer 0 was re-solved without the dropped edit
