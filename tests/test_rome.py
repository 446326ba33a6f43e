"""The ROME engine on tiny random models: the rank-one identity, each equation, determinism, sequencing."""

from __future__ import annotations

import pytest
import torch

from romeflow.engine import models
from romeflow.engine import inserts
from romeflow.engine.inserts import InsertSpec
from romeflow.engine.margins import least_scale, margin_under
from romeflow.engine.rome import (EditRequest, Rome, RomeParams, Solver, add_rank_one, context_prefixes, insert, key,
                                  subject_keys, value)

from conftest import ARCHS, EDIT_LAYER, INTERMEDIATE

# Small enough to be fast: 1 + 2·2 = 5 prompts per edit, 5 optimisation steps.
PARAMS = RomeParams(layer=EDIT_LAYER, prefix_lengths=(3, 5), prefixes_per_length=2, steps=5, seed=0)

CURIE = EditRequest("Pierre Curie", "{} worked in the field of", "medicine", "physics")
NEEDLE = EditRequest("The Space Needle", "{} is located in", "Paris", "Seattle")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def editor(lm, second_moment, model_type, params=PARAMS, spec: InsertSpec | None = None) -> Rome:
    """A ROME editor; ``spec``: one insert's settings instead of ``params.insert``'s."""
    stats = second_moment(model_type)
    rome = Rome(lm, params, lambda layer: stats[layer])
    if spec is not None:
        rome.spec = spec
    return rome


def spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 3 * n, generator=g)
    return a @ a.T / (3 * n) + 0.1 * torch.eye(n)


# --------------------------------------------------------------------------------------------------
# The rank-one identity on every architecture
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ARCHS)
def test_edit_maps_k_star_to_v_star_with_a_rank_one_update(tiny_lm, second_moment, model_type):
    lm = tiny_lm(model_type)
    name = models.edited_module_name(lm.model, EDIT_LAYER)
    module = lm.model.get_submodule(name)
    w_before = models.weight_out_in(lm.model, name).clone()
    others_before = {k: v.clone() for k, v in lm.model.state_dict().items() if not k.startswith(name)}
    rome = editor(lm, second_moment, model_type)

    (result,) = rome.apply([CURIE])

    assert result.update.module == name and result.update.layer == EDIT_LAYER
    assert result.k_star.shape == (INTERMEDIATE,)
    assert result.v_star.shape == w_before.shape[:1]
    with torch.no_grad():
        mapped = module(result.k_star[None])[0]
    assert rel_err(mapped, result.v_star) < 1e-5

    delta_w = (models.weight_out_in(lm.model, name) - w_before).double()
    torch.testing.assert_close(delta_w, torch.outer(result.update.u, result.update.v).double(),
                               rtol=1e-4, atol=1e-6)
    s = torch.linalg.svdvals(delta_w)
    assert s[0] > 0 and s[1] / s[0] < 1e-4  # rank one (up to float32 rounding of W + ΔW)
    # The factors are ΔW = Λ (C⁻¹k*)ᵀ.
    c = second_moment(model_type)[EDIT_LAYER].double()
    torch.testing.assert_close(result.update.v.double(), torch.linalg.solve(c, result.k_star.double()),
                               rtol=1e-4, atol=1e-6)
    # Nothing but the edited module changed.
    after = lm.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in others_before.items())
    assert set(result.timings) == {"prefixes", "key", "value", "insert"}
    assert 1 <= len(result.nll_trace) <= PARAMS.steps + 1


@pytest.mark.parametrize("model_type", ARCHS)
def test_asymmetric_keys_map_the_bare_prompt_key_to_v_star(tiny_lm, second_moment, model_type):
    lm = tiny_lm(model_type)
    params = RomeParams(**{**PARAMS.__dict__, "symmetric_keys": False})
    module = models.edited_module(lm.model, EDIT_LAYER)
    k_bare = subject_keys(lm, EDIT_LAYER, ["{}"], CURIE.subject)[0]

    (result,) = editor(lm, second_moment, model_type, params).apply([CURIE])

    with torch.no_grad():
        assert rel_err(module(k_bare[None])[0], result.v_star) < 1e-5
        # k* is a prefix average, not the bare key, so the edit does not map k* exactly to v*.
        assert not torch.allclose(k_bare, result.k_star)
        assert rel_err(module(result.k_star[None])[0], result.v_star) > 1e-4
    # The key of the edited module's input is unaffected by editing that module.
    torch.testing.assert_close(subject_keys(lm, EDIT_LAYER, ["{}"], CURIE.subject)[0], k_bare, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# Eq. 2: the solver and the closed-form insert
# --------------------------------------------------------------------------------------------------


def test_solver_solves_the_second_moment_system():
    c = spd(24, seed=1)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        k = torch.randn(24, generator=g)
        got = Solver(c)(k)
        assert got.dtype == torch.float32 and got.shape == (24,)
        want = torch.linalg.solve(c.double(), k.double())
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close((c.double() @ got.double()), k.double(), rtol=1e-4, atol=1e-5)


def test_solver_rejects_a_singular_second_moment():
    a = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="not positive definite"):
        Solver(a @ a.T)  # rank 3 < 8: fewer tokens than dimensions
    with pytest.raises(ValueError, match="not positive definite"):
        Solver(-torch.eye(4))


@pytest.mark.parametrize("symmetric", [True, False])
def test_insert_is_the_closed_form_of_eq_2(symmetric):
    d_out, d_in = 6, 10
    g = torch.Generator().manual_seed(3)
    c = spd(d_in, seed=4)
    w = torch.randn(d_out, d_in, generator=g)
    k_star = torch.randn(d_in, generator=g)
    v_star = torch.randn(d_out, generator=g)
    k_d = k_star if symmetric else k_star + 0.3 * torch.randn(d_in, generator=g)

    u, v = insert(Solver(c), k_star, v_star, k_d, w @ k_d)

    # Independent float64 evaluation of Ŵ = W + (v* − W k_d)(C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k_d).
    c64, w64, ks, kd, vs = c.double(), w.double(), k_star.double(), k_d.double(), v_star.double()
    c_inv_k = torch.linalg.solve(c64, ks)
    w_hat = w64 + torch.outer(vs - w64 @ kd, c_inv_k) / (c_inv_k @ kd)
    torch.testing.assert_close(v.double(), c_inv_k, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w64 + torch.outer(u.double(), v.double()), w_hat, rtol=1e-5, atol=1e-5)
    # Its defining properties: Ŵ k_d = v*, and (Ŵ − W) C = Λ k*ᵀ (the minimal-disturbance condition).
    torch.testing.assert_close(w_hat @ kd, vs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close((w_hat - w64) @ c64, torch.outer(u.double(), ks), rtol=1e-4, atol=1e-5)
    # Any key orthogonal to C⁻¹k* is left untouched.
    z = torch.randn(d_in, generator=g).double()
    z = z - (z @ c_inv_k) / (c_inv_k @ c_inv_k) * c_inv_k
    torch.testing.assert_close(w_hat @ z, w64 @ z, rtol=1e-6, atol=1e-6)


def test_add_rank_one_writes_through_a_conv1d_view(tiny_lm):
    lm = tiny_lm("gpt2")  # GPT-2 stores (d_in, d_out)
    name = models.edited_module_name(lm.model, 0)
    before = lm.model.get_submodule(name).weight.clone()
    u, v = torch.arange(32.0), torch.ones(INTERMEDIATE)
    add_rank_one(lm.model, name, u, v)
    torch.testing.assert_close(lm.model.get_submodule(name).weight - before, torch.outer(v, u))


# --------------------------------------------------------------------------------------------------
# Eq. 3 and 4: prefixes, key, value
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["gpt2", "gemma3_text"])
def test_context_prefixes_are_seeded(tiny_lm, model_type):
    lm = tiny_lm(model_type)
    a = context_prefixes(lm, PARAMS)
    b = context_prefixes(lm, PARAMS)
    other = context_prefixes(lm, RomeParams(**{**PARAMS.__dict__, "seed": 1}))
    assert a == b
    assert a != other
    expected_len = 1 + len(PARAMS.prefix_lengths) * PARAMS.prefixes_per_length
    assert len(a) == len(other) == expected_len
    assert a[0] == "" and other[0] == ""
    for p in a[1:]:
        assert p.endswith(". ") and len(p) > 2
        assert "{" not in p and "}" not in p
        assert "<bos>" not in p and "<eos>" not in p and "<pad>" not in p
    # Prefixes start with the configured starting words, cycling through them.
    starts = [p.split()[0] for p in a[1:]]
    assert all(s.startswith(w) for s, w in zip(starts, ["The", "Therefore", "The", "Therefore"]))


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_key_is_the_prefix_average_of_subject_keys(tiny_lm, model_type):
    lm = tiny_lm(model_type)
    prefixes = ["", "The river flows. ", "I think so. "]
    k_star = key(lm, EDIT_LAYER, "Pierre Curie", prefixes)
    singles = torch.stack([subject_keys(lm, EDIT_LAYER, [p + "{}"], "Pierre Curie")[0] for p in prefixes])
    torch.testing.assert_close(k_star, singles.mean(0), rtol=1e-5, atol=1e-6)
    # The key at the last subject token does not depend on what follows the subject.
    followed = subject_keys(lm, EDIT_LAYER, ["The river flows. {} worked in Paris"], "Pierre Curie")[0]
    torch.testing.assert_close(followed, singles[1], rtol=1e-5, atol=1e-6)


# The tiny random models respond weakly to δ, so with the default weight decay (0.5) and lr (0.5) the
# clamped optimisation oscillates after its first step. These settings isolate the NLL term.
NLL_ONLY = RomeParams(**{**PARAMS.__dict__, "steps": 8, "lr": 0.1, "weight_decay": 0.0, "kl_factor": 0.0})


@pytest.mark.parametrize("model_type", ARCHS)
def test_value_lowers_the_target_nll(tiny_lm, model_type):
    lm = tiny_lm(model_type)
    prefixes = context_prefixes(lm, NLL_ONLY)
    k_star = key(lm, EDIT_LAYER, CURIE.subject, prefixes)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}

    v_star, trace = value(lm, EDIT_LAYER, CURIE, prefixes, k_star, NLL_ONLY)

    assert len(trace) == NLL_ONLY.steps + 1  # never early-stopped; the last entry scores the δ returned
    assert all(t > 0 for t in trace)
    assert trace[-1] < trace[0] - 0.05
    assert all(b <= a + 1e-3 for a, b in zip(trace, trace[1:]))  # decreasing overall
    # v* = W k* + δ with ‖δ‖ clamped.
    with torch.no_grad():
        w_k = models.edited_module(lm.model, EDIT_LAYER)(k_star[None])[0]
    assert (v_star - w_k).norm() <= NLL_ONLY.clamp_norm_factor * w_k.norm() * (1 + 1e-5)
    assert (v_star - w_k).norm() > 0
    # value() leaves the model untouched (no weights changed, no hooks left).
    after = lm.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not models.edited_module(lm.model, EDIT_LAYER)._forward_hooks


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma3_text"])
def test_value_in_place_scores_the_update_that_is_written(tiny_lm, second_moment, model_type):
    """in_place: δ is optimised under the insert's own update, so the last NLL of its trace is the
    edited model's mean target NLL on the rewrite prompts once the delta is written."""

    from romeflow.engine.prompts import fill, mean_per_pair, target_logprobs, teacher_forced

    lm = tiny_lm(model_type)
    rome = editor(lm, second_moment, model_type, NLL_ONLY, InsertSpec(in_place=True, prefix_keys=True))
    result = rome.compute(CURIE)
    k_d = result.k_star
    direction = inserts.insert_direction(rome, CURIE, EDIT_LAYER, result.k_star, k_d)
    assert rel_err(result.update.v / (result.update.v @ k_d), direction) < 1e-5  # the same direction
    prompts = [fill(x + CURIE.relation, CURIE.subject) for x in rome.prefixes]
    tb = teacher_forced(lm.tokenizer, prompts, [CURIE.target] * len(prompts))
    name = models.edited_module_name(lm.model, EDIT_LAYER)
    add_rank_one(lm.model, name, result.update.u, result.update.v)
    with torch.no_grad():
        nll = -mean_per_pair(target_logprobs(lm.model, tb), tb).mean()
    assert abs(float(nll) - result.nll_trace[-1]) < 1e-3 * max(1.0, result.nll_trace[-1])
    assert result.nll_trace[-1] < result.nll_trace[0]


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma3_text"])
def test_value_first_step_goes_downhill_with_default_loss(tiny_lm, model_type):
    lm = tiny_lm(model_type)
    params = RomeParams(**{**PARAMS.__dict__, "steps": 1})
    prefixes = context_prefixes(lm, params)
    k_star = key(lm, EDIT_LAYER, CURIE.subject, prefixes)
    _, trace = value(lm, EDIT_LAYER, CURIE, prefixes, k_star, params)
    assert len(trace) == 2 and trace[1] < trace[0]
    # Early stop: a threshold above the starting NLL stops before any step.
    _, trace = value(lm, EDIT_LAYER, CURIE, prefixes, k_star,
                     RomeParams(**{**params.__dict__, "early_stop_nll": 100.0}))
    assert len(trace) == 1


@pytest.mark.parametrize("model_type", ARCHS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_edit_raises_the_target_probability(tiny_lm, second_moment, model_type, symmetric):
    from romeflow.engine.prompts import target_logprobs, teacher_forced

    lm = tiny_lm(model_type)
    tb = teacher_forced(lm.tokenizer, [CURIE.prompt], [CURIE.target])
    with torch.no_grad():
        before = target_logprobs(lm.model, tb)
    params = RomeParams(**{**NLL_ONLY.__dict__, "symmetric_keys": symmetric})
    editor(lm, second_moment, model_type, params).apply([CURIE])
    with torch.no_grad():
        after = target_logprobs(lm.model, tb)
    assert after.sum() > before.sum() + 0.05


# --------------------------------------------------------------------------------------------------
# Determinism and sequential edits
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "gemma3_text"])
def test_same_edit_twice_is_bit_identical(tiny_lm, second_moment, model_type):
    runs = []
    for _ in range(2):
        lm = tiny_lm(model_type)
        (result,) = editor(lm, second_moment, model_type).apply([CURIE])
        runs.append((lm, result))
    (lm_a, a), (lm_b, b) = runs
    assert torch.equal(a.k_star, b.k_star)
    assert torch.equal(a.v_star, b.v_star)
    assert torch.equal(a.update.u, b.update.u)
    assert torch.equal(a.update.v, b.update.v)
    assert a.nll_trace == b.nll_trace
    assert models.fingerprint_state_dict(lm_a.model) == models.fingerprint_state_dict(lm_b.model)
    assert models.fingerprint_state_dict(lm_a.model) != tiny_lm(model_type).fingerprint


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma3_text"])
def test_sequential_edits_see_the_previous_edit(tiny_lm, second_moment, model_type):
    lm = tiny_lm(model_type)
    name = models.edited_module_name(lm.model, EDIT_LAYER)
    w0 = models.weight_out_in(lm.model, name).clone()
    first, second = editor(lm, second_moment, model_type).apply([CURIE, NEEDLE])

    # The second edit equals one computed on the model with only the first in place (same editor, so the
    # same cached prefixes), its insert holding the first edit's key fixed.
    lm_ref = tiny_lm(model_type)
    rome_ref = editor(lm_ref, second_moment, model_type)
    rome_ref.apply([CURIE])
    ref = rome_ref.compute(NEEDLE, hold=first.k_star[None])
    assert second.held == 1
    assert torch.equal(ref.v_star, second.v_star)
    assert torch.equal(ref.update.u, second.update.u)
    assert torch.equal(ref.update.v, second.update.v)
    # ... and differs from the same edit computed on the unedited model.
    fresh = editor(tiny_lm(model_type), second_moment, model_type).compute(NEEDLE)
    assert torch.equal(fresh.k_star, second.k_star)  # the layer's input does not see its own edit
    assert not torch.allclose(fresh.update.u, second.update.u)

    # Final weight: W0 + u1 v1ᵀ + u2 v2ᵀ, and the latest edit holds exactly.
    w = models.weight_out_in(lm.model, name)
    expected = w0 + torch.outer(first.update.u, first.update.v) + torch.outer(second.update.u, second.update.v)
    torch.testing.assert_close(w, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        module = lm.model.get_submodule(name)
        assert rel_err(module(second.k_star[None])[0], second.v_star) < 1e-5
        assert rel_err(module(first.k_star[None])[0], first.v_star) < 1e-5  # ... and so does the earlier one


def test_apply_reports_progress_and_honours_per_edit_layers(tiny_lm, second_moment):
    lm = tiny_lm("gpt2")
    seen = []
    results = editor(lm, second_moment, "gpt2").apply(
        [CURIE, NEEDLE], layers=[0, None], progress=lambda i, r: seen.append((i, r.update.layer)))
    assert seen == [(0, 0), (1, EDIT_LAYER)]
    assert [r.update.module for r in results] == [models.edited_module_name(lm.model, 0),
                                                  models.edited_module_name(lm.model, EDIT_LAYER)]
    with torch.no_grad():
        m0 = models.edited_module(lm.model, 0)
        assert rel_err(m0(results[0].k_star[None])[0], results[0].v_star) < 1e-5


def test_rome_params_round_trip():
    p = RomeParams.from_dict({"layer": 2, "prefix_lengths": [3, 4], "steps": 7})
    assert p.prefix_lengths == (3, 4) and p.layer == 2 and p.steps == 7
    assert RomeParams.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="unknown ROME hyper-parameter"):
        RomeParams.from_dict({"layers": 3})


# --------------------------------------------------------------------------------------------------
# The update's size: an insert's shrink_margin
# --------------------------------------------------------------------------------------------------


def test_least_scale_bisects_to_the_smallest_share_that_holds_the_margin():
    calls = []

    def margin(s):  # increasing; reaches 2.0 at s = 0.5
        calls.append(s)
        return 10.0 * s - 3.0

    s = least_scale(margin, 2.0, 6)
    assert margin(s) >= 2.0 and margin(s - 2 ** -6) < 2.0
    assert len(calls) == 1 + 6 + 2
    assert least_scale(lambda s: s, 5.0, 6) == 1.0  # even the whole update falls short: kept whole


# (not tiny GPT-J: its 20-step edit raises the new object without overtaking the old one, so there is
# no positive margin to keep; the shrink itself is a weight write and a bisection, the same everywhere)
@pytest.mark.parametrize("model_type", [a for a in ARCHS if a != "gptj"])
def test_shrink_keeps_the_least_share_of_delta_and_leaves_the_model_as_it_was(tiny_lm, second_moment, model_type):
    from dataclasses import replace

    lm = tiny_lm(model_type)
    params = replace(NLL_ONLY, steps=20, early_stop_nll=0.0)
    candidates = (CURIE, NEEDLE, replace(CURIE, target_true="Seattle"), replace(NEEDLE, target_true="physics"))
    for request in candidates:  # a random model may keep preferring the old object: the first edit that takes
        full = editor(lm, second_moment, model_type, params).compute(request)
        name = full.update.module
        w0 = models.read_weight(lm.model, name)
        margin = margin_under(lm, name, full.update.u, full.update.v, request.prompt, request.target,
                              request.target_true)
        m0, m1 = margin(0.0), margin(1.0)
        models.write_weight(lm.model, name, w0)
        if m1 > max(m0, 0.0):
            break
    assert m1 > max(m0, 0.0)  # the edit raised the new object over the old one
    target = max(m0, 0.0) + 0.5 * (m1 - max(m0, 0.0))

    shrunk = editor(lm, second_moment, model_type, params, InsertSpec(shrink_margin=target, shrink_steps=6)).compute(request)

    assert torch.equal(models.read_weight(lm.model, name), w0)  # compute() leaves the model as it was
    s = shrunk.scale
    assert 0 < s < 1 and (s * 64) == int(s * 64)
    torch.testing.assert_close(shrunk.update.u, s * full.update.u)
    torch.testing.assert_close(shrunk.update.v, full.update.v)
    assert margin(s) >= target and margin(s - 2 ** -6) < target
    models.write_weight(lm.model, name, w0)
    # the stored pair is the shrunk one: W k* + s δ, which the update maps k* to (the joint solve reads it)
    module = lm.model.get_submodule(name)
    with torch.no_grad():
        w_k = module(full.k_star[None])[0]
    assert rel_err(shrunk.v_star, w_k + s * (full.v_star - w_k)) < 1e-5
    add_rank_one(lm.model, name, shrunk.update.u, shrunk.update.v)
    with torch.no_grad():
        assert rel_err(module(shrunk.k_star[None])[0], shrunk.v_star) < 1e-5
