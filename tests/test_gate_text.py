"""stack.gate_text: each gated delta's thresholds raised at composition until corpus tokens the gate never saw
are exactly closed (pipeline/compose.py: JointSolve.raised_gates). On tiny random models:
the raise closes what it says or stops at the cap, keeps δ, depends on neither order nor the other deltas,
reverts by recomposing, and the stack file rebuilds it bit for bit."""

from __future__ import annotations

import pytest
import torch

from romeflow.engine import gated
from romeflow.engine.prompts import fill, subject_last_index
from romeflow.params import StackParams
from romeflow.pipeline.compose import (EditedModel, JointSolve, calibration_inputs, gated_edits, rethreshold,
                                       stored_gate)
from romeflow.pipeline.stackfile import load_stack_file, save_stack_file, stack_file

from conftest import EDIT_LAYER
from test_gated import gated_delta

N_TOKENS = 1024  # calibration tokens: the tiny corpus (~6k tokens) holds the gate's own 2,048 and these


def weights(lm) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("model_type", ["gemma3_text", "gpt2"])
def test_raised_gates_close_the_calibration_tokens_keep_delta_and_compose_as_a_function_of_the_deltas(
        tiny_lm, second_moment, corpus, model_type, tmp_path):
    lm = tiny_lm(model_type)
    stats = second_moment(model_type)
    a = gated_delta(lm, stats, corpus, "a", "Pierre Curie", "medicine", tmp_path)
    b = gated_delta(lm, stats, corpus, "b", "Albert Einstein", "music", tmp_path)
    base = weights(lm)
    solve = JointSolve(lambda layer: stats[layer], gate_text=N_TOKENS, corpus=corpus)
    edited = EditedModel(lm, solve)

    edited.compose([a, b])
    ab, gates = weights(lm), edited.gates
    assert len(gates) == 2
    x = calibration_inputs(lm, EDIT_LAYER, corpus, N_TOKENS)  # (N, d_model) on the base model
    rows = -(-N_TOKENS // 127)
    assert N_TOKENS - rows <= x.shape[0] <= N_TOKENS  # the tokens asked for (less a row's first without <bos>)
    z0 = gated.exact_zero_below(lm.model, EDIT_LAYER)
    raised = 0
    for (d, i), g in zip(gated_edits([a, b]), gates):
        old = stored_gate(d.updates[i], d.meta["edits"][i]["gate"])
        new = gated.Gate(old.a, old.e, g["low"], g["high"], g["beta"], old.gated)
        assert new.low >= old.low and new.high - new.low == pytest.approx(old.high - old.low, rel=1e-12)
        assert new.low <= gated.MAX_LOW or new.low == old.low
        raised += new.low > old.low
        s, c = new.score(x), new.c(x)
        closed = new.beta * (s - torch.minimum(new.low * c, new.high * c)) <= -z0  # (N,) both units exactly 0
        if new.low < gated.MAX_LOW:  # not capped: every calibration token with c > 0 is exactly closed
            assert bool(closed[c > 0].all())
        else:  # capped: it closes at least what the stored thresholds did
            s0 = old.beta * (s - torch.minimum(old.low * c, old.high * c)) <= -z0
            assert int(closed.sum()) >= int(s0.sum())
        # the same δ when fully open: the units' down columns times β(τ₁ − τ₀) (float32 rounding of the
        # division and product, ~1e-7 relative; 1e-5 leaves a margin)
        up = rethreshold(d.updates[i], old, new)
        torch.testing.assert_close(up.down[:, 0] * new.beta * (new.high - new.low),
                                   d.updates[i].down[:, 0] * old.beta * (old.high - old.low), rtol=1e-5, atol=0)
    assert raised >= 1  # not vacuous: the tiny random model's gates are open on some of the corpus

    edited.compose([b, a])
    assert same(ab, weights(lm))  # any order, bit for bit
    edited.compose([a])
    only_a = weights(lm)
    assert edited.gates == [gates[0]]  # a gate's thresholds do not depend on the other deltas
    edited.reset()
    assert same(base, weights(lm))
    fresh = EditedModel(lm, JointSolve(lambda layer: stats[layer], gate_text=N_TOKENS, corpus=corpus))
    fresh.compose([a])
    assert same(only_a, weights(lm))  # revert of b: a fresh composition of what remains
    fresh.reset()

    # the stack file keeps the thresholds, and rebuilding from it gives the composed weights bit for bit
    edited.compose([a, b])
    sf = stack_file(edited, "0" * 64)
    assert sf.meta["composition"]["settings"]["gate_text"] == N_TOKENS
    save_stack_file(tmp_path / "stack.safetensors", sf)
    loaded = load_stack_file(tmp_path / "stack.safetensors")
    edited.reset()
    rebuilt = EditedModel(lm)
    rebuilt.rebuild([a, b], loaded.linear([a, b]), loaded.gates)
    assert same(ab, weights(lm))
    rebuilt.rebuild([a, b], [], None)  # without the thresholds: the deltas as stored, which differ
    assert not same(ab, weights(lm))
    rebuilt.reset()

    # gate_text 0 is the composition as before: the stored units, as the sum composes them
    joint = EditedModel(lm, JointSolve(lambda layer: stats[layer]))
    joint.compose([a, b])
    plain = weights(lm)
    joint.reset()
    EditedModel(lm).compose([a, b])
    assert same(plain, weights(lm)) and not same(plain, ab)


def test_gate_text_is_recorded_only_when_set():
    assert "gate_text" not in StackParams(method="joint").joint_settings()  # run folders from before still match
    assert StackParams(method="joint", gate_text=4096).joint_settings()["gate_text"] == 4096
    assert JointSolve(lambda layer: None, gate_text=4096).settings()["gate_text"] == 4096


@pytest.mark.parametrize("model_type", ["gemma3_text", "gpt2"])
def test_gate_refit_refits_what_the_cap_leaves_open_and_the_stack_file_rebuilds_it(
        tiny_lm, second_moment, corpus, model_type, tmp_path, monkeypatch):
    from romeflow.pipeline import compose

    lm = tiny_lm(model_type)
    stats = second_moment(model_type)
    a = gated_delta(lm, stats, corpus, "a", "Pierre Curie", "medicine", tmp_path)
    b = gated_delta(lm, stats, corpus, "b", "Albert Einstein", "music", tmp_path)
    x = calibration_inputs(lm, EDIT_LAYER, corpus, N_TOKENS)  # (N, d_model)
    act = gated._mlp_parts(lm.model, EDIT_LAYER)[3]
    # the tiny random model's gates need less than MAX_LOW to close the tiny corpus: a lower cap makes both capped
    olds = [stored_gate(d.updates[i], d.meta["edits"][i]["gate"]) for d, i in gated_edits([a, b])]
    cap = min(g.low for g in olds) + 0.05
    assert all(gated.closing_low(g.a, g.e, g.gated, x) > cap for g in olds)
    monkeypatch.setattr(compose, "MAX_LOW", cap)
    plain = EditedModel(lm, JointSolve(lambda layer: stats[layer], gate_text=N_TOKENS, corpus=corpus))
    plain.compose([a, b])
    capped = plain.gates
    plain.reset()
    base = weights(lm)
    edited = EditedModel(lm, JointSolve(lambda layer: stats[layer], gate_text=N_TOKENS, corpus=corpus,
                                        gate_refit=True))
    edited.compose([a, b])
    ab, gates = weights(lm), edited.gates
    assert any("a" in g for g in gates)  # not vacuous: some gate refitted
    for (d, i), old, c, g in zip(gated_edits([a, b]), olds, capped, gates):
        if "a" not in g:  # a refit that would not leave fewer calibration tokens open is not kept
            assert g == c
            continue
        new = gated.Gate(g["a"], old.e, g["low"], g["high"], g["beta"], old.gated)
        before = gated.Gate(old.a, old.e, c["low"], c["high"], c["beta"], old.gated)
        e = d.meta["manifest"]["canonical"]["edits"][0]
        x_star = gated.mlp_inputs(lm, EDIT_LAYER, [fill(e["relation"], e["subject"])],
                                  [subject_last_index(lm.tokenizer, e["relation"], e["subject"])])  # (1, d_model)
        # s(x*) = 1 as the insert normalised it: the same float32 dot products, ~1e-6 relative apart
        assert float(new.score(x_star)[0]) == pytest.approx(1.0, rel=1e-4)
        assert float(gated.gate_values(new, act, x_star)[0]) == pytest.approx(1.0, rel=1e-4)  # fully open there
        # the kept refit closes calibration tokens the capped direction left open: fewer open
        assert int((gated.gate_values(new, act, x) != 0).sum()) < int((gated.gate_values(before, act, x) != 0).sum())
        up = rethreshold(d.updates[i], old, new)  # δ kept (float32 rounding, as above)
        torch.testing.assert_close(up.down[:, 0] * new.beta * (new.high - new.low),
                                   d.updates[i].down[:, 0] * old.beta * (old.high - old.low), rtol=1e-5, atol=0)
    edited.compose([b, a])
    assert same(ab, weights(lm))  # any order, bit for bit
    edited.compose([a])
    assert torch.equal(edited.gates[0]["a"], gates[0]["a"])  # a gate's refit does not depend on the other deltas
    edited.reset()
    assert same(base, weights(lm))

    edited.compose([a, b])
    sf = stack_file(edited, "0" * 64)
    assert sf.meta["composition"]["settings"]["gate_refit"] is True
    assert [g.get("refit", False) for g in sf.meta["gates"]] == ["a" in g for g in gates]
    save_stack_file(tmp_path / "stack.safetensors", sf)
    loaded = load_stack_file(tmp_path / "stack.safetensors")
    edited.reset()
    rebuilt = EditedModel(lm)
    rebuilt.rebuild([a, b], loaded.linear([a, b]), loaded.gates)
    assert same(ab, weights(lm))  # the refitted directions are stored: the export is the stack, bit for bit
    rebuilt.reset()


def test_gate_refit_is_recorded_only_when_set():
    assert "gate_refit" not in StackParams(method="joint", gate_text=4096).joint_settings()
    assert StackParams(method="joint", gate_text=4096, gate_refit=True).joint_settings()["gate_refit"] is True
