"""Delta artifacts: determinism, exact composition and revert, provenance checks, size, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch

from romeflow.pipeline.deltas import Delta, DeltaError, check_applicable, compute_delta, load_delta, save_delta
from romeflow.pipeline.compose import EditedModel
from romeflow.pipeline.manifests import load_manifest
from romeflow.engine.statistics import Stats

from conftest import EDIT_LAYER
from test_rome import NLL_ONLY as PARAMS

MANIFESTS = {
    "a": ("Pierre Curie", "{} worked in the field of", "medicine", "physics"),
    "b": ("The Space Needle", "{} is located in", "Paris", "Seattle"),
    "c": ("Danielle Darrieux", "The mother tongue of {} is", "Italian", "French"),
}


def manifest(tmp_path, name, edits):
    lines = ["edits:"]
    for subject, relation, target, true in edits:
        lines += [f"  - subject: {subject}", f"    relation: \"{relation}\"", f"    target: {target}",
                  f"    target_true: {true}"]
    p = tmp_path / f"{name}.yaml"
    p.write_text("\n".join(lines) + "\n")
    return load_manifest(p)


@pytest.fixture
def gpt2(tiny_lm, second_moment):
    lm = tiny_lm("gpt2")
    c = second_moment("gpt2")[EDIT_LAYER]
    stats = {EDIT_LAYER: Stats(c, {"corpus_id": "tiny", "corpus_sha256": "0" * 64, "tokens": 4000}, "1" * 64)}
    return lm, stats


def params_dict(lm):
    return {n: p.detach().clone() for n, p in lm.model.state_dict().items()}


def test_compute_delta_leaves_the_base_model_untouched(tmp_path, gpt2):
    lm, stats = gpt2
    before = params_dict(lm)
    delta = compute_delta(lm, manifest(tmp_path, "a", [MANIFESTS["a"]]), PARAMS, stats)
    assert len(delta.updates) == 1
    assert all(torch.equal(before[n], p) for n, p in lm.model.state_dict().items())
    e = delta.meta["edits"][0]
    assert e["after"]["p_target"] > e["before"]["p_target"]


def test_same_manifest_twice_gives_byte_identical_files(tmp_path, gpt2):
    lm, stats = gpt2
    m = manifest(tmp_path, "ab", [MANIFESTS["a"], MANIFESTS["b"]])
    save_delta(tmp_path / "1.safetensors", compute_delta(lm, m, PARAMS, stats))
    save_delta(tmp_path / "2.safetensors", compute_delta(lm, m, PARAMS, stats))
    assert (tmp_path / "1.safetensors").read_bytes() == (tmp_path / "2.safetensors").read_bytes()


def test_delta_file_round_trip_and_provenance(tmp_path, gpt2):
    lm, stats = gpt2
    m = manifest(tmp_path, "a", [MANIFESTS["a"]])
    delta = compute_delta(lm, m, PARAMS, stats)
    save_delta(tmp_path / "a.safetensors", delta)
    back = load_delta(tmp_path / "a.safetensors")
    assert back.meta == json.loads(json.dumps(delta.meta))
    assert back.meta["manifest"]["sha256"] == m.sha256
    assert back.meta["base_model"]["fingerprint"] == lm.fingerprint
    assert back.meta["stats"][0]["sha256"] == "1" * 64
    assert back.meta["hyperparameters"]["layer"] == EDIT_LAYER
    assert back.meta["context_prefixes"][0] == ""
    for u, w in zip(back.updates, delta.updates):
        assert torch.equal(u.u, w.u) and torch.equal(u.v, w.v) and u.module == w.module


def test_delta_size_per_edit_is_within_budget(tmp_path, gpt2):
    lm, stats = gpt2
    m = manifest(tmp_path, "abc", list(MANIFESTS.values()))
    delta = compute_delta(lm, m, PARAMS, stats)
    save_delta(tmp_path / "abc.safetensors", delta)
    d_in, d_out = delta.updates[0].v.numel(), delta.updates[0].u.numel()
    size = (tmp_path / "abc.safetensors").stat().st_size
    # per edit: the rank-one factors u, v and the pair k*, v* (float32), plus metadata
    assert len(delta.updates) * (d_in + d_out) * 4 * 2 < size <= len(delta.updates) * ((d_in + d_out) * 4 * 2 + 4096)


def test_applying_the_delta_reproduces_the_editors_weights(tmp_path, gpt2, tiny_lm):
    from romeflow.engine.rome import Rome

    lm, stats = gpt2
    m = manifest(tmp_path, "ab", [MANIFESTS["a"], MANIFESTS["b"]])
    delta = compute_delta(lm, m, PARAMS, stats)
    edited = tiny_lm("gpt2")
    Rome(edited, PARAMS, lambda l: stats[l].second_moment).apply([e.request for e in m.edits])
    EditedModel(lm).compose([delta])
    for (n, p), (_, q) in zip(lm.model.state_dict().items(), edited.model.state_dict().items()):
        assert torch.equal(p, q), n


def test_drop_b_equals_base_plus_a_plus_c_bit_for_bit(tmp_path, gpt2, tiny_lm):
    lm, stats = gpt2
    deltas = {}
    for name, edit in MANIFESTS.items():
        save_delta(tmp_path / f"{name}.safetensors", compute_delta(lm, manifest(tmp_path, name, [edit]), PARAMS, stats))
        deltas[name] = load_delta(tmp_path / f"{name}.safetensors")
    base = params_dict(lm)
    stacked = EditedModel(lm)
    stacked.compose([deltas["a"], deltas["b"], deltas["c"]])
    module = deltas["a"].updates[0].module
    assert not torch.equal(lm.model.get_submodule(module).weight, base[module + ".weight"])
    stacked.compose([deltas["a"], deltas["c"]])  # drop B
    fresh = tiny_lm("gpt2")
    EditedModel(fresh).compose([deltas["a"], deltas["c"]])
    for (n, p), (_, q) in zip(lm.model.state_dict().items(), fresh.model.state_dict().items()):
        assert torch.equal(p, q), n
    stacked.reset()
    assert all(torch.equal(base[n], p) for n, p in lm.model.state_dict().items())


def test_delta_refuses_another_base_model(tmp_path, gpt2, tiny_lm):
    lm, stats = gpt2
    delta = compute_delta(lm, manifest(tmp_path, "a", [MANIFESTS["a"]]), PARAMS, stats)
    other = tiny_lm("gpt2")
    with torch.no_grad():
        other.model.transformer.wte.weight[0, 0] += 1.0
    from romeflow.engine.models import fingerprint_state_dict

    other.fingerprint = fingerprint_state_dict(other.model)
    with pytest.raises(DeltaError, match="computed on base model"):
        check_applicable(delta, other)
    with pytest.raises(DeltaError, match="computed on base model"):
        EditedModel(other).compose([delta])


def test_delta_refuses_a_module_of_the_wrong_shape(tmp_path, gpt2):
    lm, stats = gpt2
    delta = compute_delta(lm, manifest(tmp_path, "a", [MANIFESTS["a"]]), PARAMS, stats)
    delta.updates[0].v = torch.zeros(delta.updates[0].v.numel() + 1)
    with pytest.raises(DeltaError, match="do not fit"):
        check_applicable(delta, lm)


def test_bad_delta_files_fail_clearly_and_writes_are_atomic(tmp_path, gpt2):
    lm, stats = gpt2
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(DeltaError, match=f"{junk}: not a romeflow delta file"):
        load_delta(junk)
    with pytest.raises(DeltaError, match="delta file not found"):
        load_delta(tmp_path / "missing.safetensors")
    delta = compute_delta(lm, manifest(tmp_path, "a", [MANIFESTS["a"]]), PARAMS, stats)
    broken = Delta(delta.updates, {**delta.meta, "seed": "zero"})
    with pytest.raises(DeltaError, match="seed"):
        save_delta(tmp_path / "out" / "x.safetensors", broken)
    assert not (tmp_path / "out" / "x.safetensors").exists()
    assert not list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True
