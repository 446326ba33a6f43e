"""The gated insert (engine/gated.py, pipeline/neurons.py) on tiny random models of every architecture:
the edit is exactly δ at the rewrite prompt and exactly nothing below the threshold; delta files, composition,
revert and export keep that."""

from __future__ import annotations

import pytest
import torch

from romeflow.engine import gated, models
from romeflow.engine.hooks import on_input, on_output, run_with_hooks
from romeflow.engine.prompts import encode, subject_last_index
from romeflow.engine.rome import EditRequest, Rome, RomeParams, apply_update
from romeflow.pipeline.deltas import DeltaError, compute_delta, load_delta, save_delta
from romeflow.pipeline.compose import EditedModel, JointSolve
from romeflow.pipeline.manifests import Manifest, ManifestEdit

from conftest import ARCHS, EDIT_LAYER

PARAMS = RomeParams(layer=EDIT_LAYER, insert="gated", prefix_lengths=(3,), prefixes_per_length=2, steps=8, seed=0)
CURIE = EditRequest("Pierre Curie", "{} worked in the field of", "medicine", "physics")


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def mlp_output_at(lm, layer: int, text: str, position: int) -> torch.Tensor:
    """The MLP's output (d_model,) at one token of a text."""
    mlp = models.block_submodule(lm.model, layer, "mlp")
    found = {}
    batch = encode(lm.tokenizer, [text])
    with torch.no_grad(), run_with_hooks(lm.model, [on_output(mlp, lambda _m, _i, out: found.__setitem__("y", out))]):
        lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return found["y"][0, position].detach().clone()


@pytest.mark.parametrize("model_type", ARCHS)
def test_gated_edit_is_delta_at_the_prompt_and_exactly_nothing_below_the_threshold(tiny_lm, second_moment, corpus,
                                                                                   model_type):
    lm = tiny_lm(model_type)
    stats = second_moment(model_type)
    rome = Rome(lm, PARAMS, lambda layer: stats[layer], corpus=corpus)
    result = rome.compute(CURIE)
    up = result.update
    assert isinstance(up, gated.NeuronUpdate) and up.width == 2
    assert (up.up is not None) == (models.arch_of(lm.model).mlp_gate is not None)  # gated MLP: no bias
    delta = result.v_star - rome.module_out(EDIT_LAYER, result.k_star)  # (d_model,) v* − W k*
    at = subject_last_index(lm.tokenizer, CURIE.relation, CURIE.subject)
    before = mlp_output_at(lm, EDIT_LAYER, CURIE.prompt, at)
    width = gated.hidden_width(lm.model, EDIT_LAYER)
    apply_update(lm.model, up)
    assert gated.hidden_width(lm.model, EDIT_LAYER) == width + 2
    after = mlp_output_at(lm, EDIT_LAYER, CURIE.prompt, at)
    # At the rewrite prompt the gate is 1 (s = c = 1 there by construction, past τ₁): the edit adds δ, as Eq. 2
    # maps k* to v*. The MLP sums its units in another order once widened: float32 rounding of sums of ~64
    # terms, ~1e-6 relative to the output; 1e-4 of δ (which is comparable in size to it here) leaves a margin.
    assert rel(after - before, delta) < 1e-4

    # Below the threshold the two units are exactly 0: the input of the output projection, at every token of
    # generic text, in the units' two coordinates.
    down = models.edited_module(lm.model, EDIT_LAYER)
    mlp = models.block_submodule(lm.model, EDIT_LAYER, "mlp")
    seen = {}
    text = rome.text_inputs(EDIT_LAYER)  # (N, d_model), the gate's own negatives
    ids = encode(lm.tokenizer, ["The river flows through the old town and the city of Rome.",
                                "Albert Einstein worked in the field of physics."])
    with torch.no_grad(), run_with_hooks(lm.model, [on_input(mlp, lambda _m, a: seen.__setitem__("x", a[0])),
                                                    on_input(down, lambda _m, a: seen.__setitem__("k", a[0]))]):
        lm.model(input_ids=ids.input_ids, attention_mask=ids.attention_mask)
    x, k = seen["x"].reshape(-1, seen["x"].shape[-1]), seen["k"].reshape(-1, seen["k"].shape[-1])
    x = torch.cat([x, text])
    gate = rome.scratch["gate"]  # the edit's gate (engine/gated.py: Gate)
    z0 = gated.exact_zero_below(lm.model, EDIT_LAYER)
    s, c = gate.score(x), gate.c(x)
    below = gate.beta * (s - torch.minimum(gate.low * c, gate.high * c)) <= -z0  # (N,) both pre-activations ≤ −z₀
    assert below.sum() >= 200  # not a vacuous check: (on a tiny random model) hundreds of the ~2,000 tokens are below
    units = gated.unit_activations(lm.model, EDIT_LAYER, x, 2)  # (N, 2) what the widened MLP computes
    assert torch.equal(units[below].abs(), torch.zeros_like(units[below]))
    assert torch.equal(k[:, -2:][below[:k.shape[0]]], torch.zeros_like(k[:, -2:][below[:k.shape[0]]]))
    gated.cut_neurons(lm.model, EDIT_LAYER, width)
    assert torch.equal(mlp_output_at(lm, EDIT_LAYER, CURIE.prompt, at), before)


class _Stats:
    def __init__(self, c):
        self.second_moment, self.sha256 = c, "0" * 64
        self.meta = {"corpus_id": "tiny", "corpus_sha256": "0" * 64, "tokens": 1}


def gated_delta(lm, stats, corpus, name: str, subject: str, target: str, tmp_path):
    edit = ManifestEdit(subject, "{} worked in the field of", target)
    manifest = Manifest(str(tmp_path / f"{name}.yaml"), name, "0" * 64, (edit,))
    delta = compute_delta(lm, manifest, PARAMS, {EDIT_LAYER: _Stats(stats[EDIT_LAYER])}, corpus=corpus)
    path = tmp_path / f"{name}.safetensors"
    save_delta(path, delta)
    return load_delta(path)


@pytest.mark.parametrize("model_type", ["gemma3_text", "gpt2"])
def test_gated_deltas_compose_in_any_order_revert_bit_exactly_and_export(tiny_lm, second_moment, corpus,
                                                                         model_type, tmp_path):
    import transformers

    from romeflow.pipeline.export import write_merged, write_peft

    lm = tiny_lm(model_type)
    stats = second_moment(model_type)
    a = gated_delta(lm, stats, corpus, "a", "Pierre Curie", "medicine", tmp_path)
    b = gated_delta(lm, stats, corpus, "b", "Albert Einstein", "music", tmp_path)
    assert a.meta["format"] == "romeflow.delta/2" and a.meta["edits"][0]["neurons"] == 2 and a.pairs is None
    base = {k: v.clone() for k, v in lm.model.state_dict().items()}
    edited = EditedModel(lm)

    def weights() -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in lm.model.state_dict().items()}

    edited.compose([a, b])
    ab = weights()
    edited.compose([b, a])
    assert ab.keys() == weights().keys() and all(torch.equal(ab[k], v) for k, v in weights().items())  # any order
    edited.compose([a])
    only_a = weights()
    edited.reset()
    assert all(torch.equal(base[k], v) for k, v in weights().items()) and weights().keys() == base.keys()
    edited.compose([a])
    assert all(torch.equal(only_a[k], v) for k, v in weights().items())  # revert of b = a alone, bit for bit
    edited.reset()
    linear = compute_delta(lm, Manifest(str(tmp_path / "c.yaml"), "c", "0" * 64,
                                        (ManifestEdit("Marie Curie", "{} was born in", "Rome"),)),
                           RomeParams(layer=EDIT_LAYER, prefix_lengths=(3,), prefixes_per_length=2, steps=4),
                           {EDIT_LAYER: _Stats(stats[EDIT_LAYER])})
    save_delta(tmp_path / "c.safetensors", linear)
    with pytest.raises(DeltaError, match="stack.method: joint: .* is a gated edit and .* a linear one"):
        JointSolve(lambda layer: stats[layer]).check([a, load_delta(tmp_path / "c.safetensors")])
    edited.compose([a, b])
    with pytest.raises(ValueError, match="--format peft: a gated edit"):
        write_peft(tmp_path / "peft", lm, [a, b], "base")

    ids = encode(lm.tokenizer, [CURIE.prompt, "Albert Einstein worked in the field of"])
    with torch.no_grad():
        want = lm.model(input_ids=ids.input_ids, attention_mask=ids.attention_mask).logits
    write_merged(tmp_path / "export", lm, [a, b])
    assert all(torch.equal(ab[k], v) for k, v in weights().items())  # the live model is left as it was
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        got = stock(input_ids=ids.input_ids, attention_mask=ids.attention_mask).logits
    # The exported model has zero units in every other layer (φ(0)·0 = 0 exactly) and the same weights in this
    # one: the same computation up to the sums' order in the wider matmuls (float32, ~1e-7 relative).
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["gpt2"])  # (on the tiny random Gemma and Llama the gate fires before the
# subject even when narrow: their v* then runs every token, and silent_before_subject says so)
def test_gated_value_with_the_prompt_heads_cached_is_the_full_computation(tiny_lm, second_moment, corpus, model_type):
    """When the gate is 0 before the last subject token, v* runs the prompts' heads once (KV cache): the same
    δ as running every token at every step."""
    from romeflow.engine.rome import key, value

    lm = tiny_lm(model_type)
    stats = second_moment(model_type)
    rome = Rome(lm, PARAMS, lambda layer: stats[layer], corpus=corpus)
    # a narrow gate (open from s = 0.9; the prompt scores 1): on a tiny random model the default one may fire
    # before the subject, and then the heads are not cached (silent_before_subject is False)
    gate = gated.fit_gate(rome, CURIE, EDIT_LAYER, 0.9, 0.95, 1e-2)  # (a family may raise it further)
    assert gated.silent_before_subject(rome, EDIT_LAYER, gate, CURIE)
    k_star = key(lm, EDIT_LAYER, CURIE.subject, rome.prefixes)
    hooks = lambda delta: gated.gate_hook(rome, EDIT_LAYER, gate, delta)  # noqa: E731
    fast, trace_fast = value(lm, EDIT_LAYER, CURIE, rome.prefixes, k_star, PARAMS, hooks_for=hooks, cache_prefix=True)
    full, trace_full = value(lm, EDIT_LAYER, CURIE, rome.prefixes, k_star, PARAMS, hooks_for=hooks, cache_prefix=False)
    # The cached forward sums attention over the same tokens in another grouping: float32 rounding, ~1e-6 relative
    # per step, compounded over 8 Adam steps; 1e-3 relative is far above that and far below any real difference.
    assert len(trace_fast) == len(trace_full)
    torch.testing.assert_close(fast, full, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("model_type", ["gemma3_text", "gpt2"])
def test_a_protected_subject_gets_exactly_nothing(tiny_lm, second_moment, corpus, model_type):
    """protect: subjects are the gate's negatives, and the fit checks that the gate is exactly closed at their
    inputs (else one line naming them); the edit then adds exactly 0 there."""
    import dataclasses

    from romeflow.engine.rome import InsertError

    lm = tiny_lm(model_type)
    stats = second_moment(model_type)
    rome = Rome(lm, PARAMS, lambda layer: stats[layer], corpus=corpus)
    request = dataclasses.replace(CURIE, protect=("Marie Curie",))
    try:
        result = rome.compute(request)
    except InsertError as e:  # a tiny random model may not separate them: then it says so, naming her
        assert "protect: Marie Curie:" in str(e)
        return
    assert result.protected == ["Marie Curie"]
    held = gated.held_inputs(rome, request, EDIT_LAYER)  # (h, d_model)
    width = gated.hidden_width(lm.model, EDIT_LAYER)
    apply_update(lm.model, result.update)
    units = gated.unit_activations(lm.model, EDIT_LAYER, held, 2)
    assert torch.equal(units.abs(), torch.zeros_like(units))
    gated.cut_neurons(lm.model, EDIT_LAYER, width)


def test_the_gated_insert_from_the_command_line_and_its_bad_inputs(tmp_path, model_dir):
    """`rome.insert: gated` end to end on a tiny project (apply, eval, export in both formats), and the gated
    delta's bad inputs: each one line naming the file and the tensor or option, nothing written."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from test_workflow import cli, make_project, one_line

    root = make_project(tmp_path / "p", model_dir, manifests=("a",), active=("a",))
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("rome:\n", "rome:\n  insert: gated\n"))
    r = cli(root, "apply", "edits/a.yaml")
    assert r.exit_code == 0, r.output
    delta = root / "deltas" / "a.safetensors"
    with safe_open(delta, framework="pt") as f:
        meta = json.loads(f.metadata()["romeflow"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["format"] == "romeflow.delta/2" and meta["edits"][0]["neurons"] == 2
    assert sorted(tensors) == ["edits.0.bias", "edits.0.down", "edits.0.gate"]  # GPT-2: an MLP with biases
    assert cli(root, "eval", "edits/a.yaml").exit_code == 0
    r = cli(root, "export", "hf", "--delta", str(delta))
    assert r.exit_code == 0, r.output

    before = {p.name for p in root.iterdir()}
    r = cli(root, "export", "--format", "peft", "adapter", "--delta", str(delta))
    assert r.exit_code != 0 and "--format peft: a gated edit" in one_line(r) and "deltas/a.safetensors" in one_line(r)
    assert {p.name for p in root.iterdir()} == before  # nothing written

    def broken(name: str, change) -> str:
        t, m = dict(tensors), json.loads(json.dumps(meta))
        change(t, m)
        path = root / "deltas" / f"{name}.safetensors"
        save_file(t, path, metadata={"romeflow": json.dumps(m)})
        r = cli(root, "generate", "Pierre Curie", "--delta", str(path))
        assert r.exit_code != 0
        return one_line(r)

    assert "edits.0.down: missing" in broken("nodown", lambda t, m: t.pop("edits.0.down"))
    assert "edits.0.gate: shape (3, 32), expected (2, 32)" in broken(
        "wide", lambda t, m: t.__setitem__("edits.0.gate", torch.zeros(3, 32)))
    assert "tensors_sha256" in broken("tampered", lambda t, m: t.__setitem__("edits.0.down", t["edits.0.down"] * 2))
    assert "metadata edits[0].neurons: must be <= 64" in broken(
        "many", lambda t, m: m["edits"][0].__setitem__("neurons", 65))


@pytest.mark.parametrize("model_type", ["gemma3_text", "gpt2"])
def test_a_manifest_of_three_gated_edits_writes_each_after_the_last(tiny_lm, second_moment, corpus, model_type,
                                                                      tmp_path):
    """Three edits in one manifest: each is computed with the earlier ones' units in place (the MLP one unit pair
    wider per edit), each keeps two units, and composing the delta gives an edit's prompt its own δ."""
    lm = tiny_lm(model_type)
    stats = second_moment(model_type)
    width = gated.hidden_width(lm.model, EDIT_LAYER)
    edits = (ManifestEdit("Pierre Curie", "{} worked in the field of", "medicine"),
             ManifestEdit("Albert Einstein", "{} worked in the field of", "music"),
             ManifestEdit("Niels Bohr", "{} worked in the field of", "law"))
    manifest = Manifest(str(tmp_path / "three.yaml"), "three", "0" * 64, edits)
    delta = compute_delta(lm, manifest, PARAMS, {EDIT_LAYER: _Stats(stats[EDIT_LAYER])}, corpus=corpus)
    save_delta(tmp_path / "three.safetensors", delta)
    three = load_delta(tmp_path / "three.safetensors")
    assert [e["neurons"] for e in three.meta["edits"]] == [2, 2, 2]
    assert gated.hidden_width(lm.model, EDIT_LAYER) == width  # compute_delta leaves the base model as it was
    prompt = "Albert Einstein worked in the field of"
    at = subject_last_index(lm.tokenizer, "{} worked in the field of", "Albert Einstein")  # where its gate opens
    before = mlp_output_at(lm, EDIT_LAYER, prompt, at)
    EditedModel(lm).compose([three])
    assert gated.hidden_width(lm.model, EDIT_LAYER) == width + 6
    assert not torch.equal(mlp_output_at(lm, EDIT_LAYER, prompt, at), before)
