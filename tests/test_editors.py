"""Editors behind one interface (ROME, FT, FT+L, KN) on tiny random models: exact restore, constraints,
factored updates, and the cached integrated gradients against a direct computation."""

from __future__ import annotations

import pytest
import torch

from romeflow.engine.editors import (FineTune, FtParams, KnowledgeNeurons, KnParams, RomeEditor, last_token_keys,
                              make_editor, neuron_attributions, target_loss)
from romeflow.engine.models import edited_module, edited_module_name, final_hidden, logits_at, weight_out_in
from romeflow.engine.rome import EditRequest, RomeParams

from conftest import ARCHS, EDIT_LAYER

CURIE = EditRequest("Pierre Curie", "{} worked in the field of", "medicine", "physics")
ROME = RomeParams(layer=EDIT_LAYER, prefix_lengths=(3,), prefixes_per_length=2, steps=4, seed=0)
FT = FtParams(layer=EDIT_LAYER, lr=1e-2, steps=5, early_stop_loss=0.0)


def editors(lm, second_moment, model_type):
    stats = second_moment(model_type)
    return [RomeEditor(lm, ROME, lambda layer: stats[layer]), FineTune(lm, FT),
            FineTune(lm, FtParams(**{**FT.to_dict(), "linf": 1e-3})), KnowledgeNeurons(lm, KnParams(ig_steps=4))]


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma3_text"])
def test_every_editor_changes_the_model_and_restores_it_bit_for_bit(tiny_lm, second_moment, model_type):
    lm = tiny_lm(model_type)
    before = state(lm.model)
    for editor in editors(lm, second_moment, model_type):
        edit = editor.edit(CURIE)
        changed = [k for k, v in lm.model.state_dict().items() if not torch.equal(v, before[k])]
        assert changed, editor.name
        assert all(".mlp." in k for k in changed), (editor.name, changed)  # only MLP projections
        edit.restore(lm.model)
        assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items()), editor.name
        assert all(not p.requires_grad for p in lm.model.parameters()) or editor.name != "ft"


def test_factored_updates_reproduce_the_weight_change(tiny_lm, second_moment):
    lm = tiny_lm("gpt2")
    for editor in editors(lm, second_moment, "gpt2"):
        edit = editor.edit(CURIE)
        if edit.updates is None:  # FT: dense
            edit.restore(lm.model)
            continue
        for name, original in edit.originals.items():
            want = weight_out_in(lm.model, name) - original  # (d_out, d_in)
            got = sum(torch.outer(u.u, u.v) for u in edit.updates if u.module == name)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        edit.restore(lm.model)


def test_ft_lowers_the_target_nll_and_ftl_stays_within_its_bound(tiny_lm):
    lm = tiny_lm("gemma3_text")
    with torch.no_grad():
        nll0 = target_loss(lm, CURIE.prompt, CURIE.target).item()
    w0 = weight_out_in(lm.model, edited_module_name(lm.model, EDIT_LAYER)).clone()
    edit = FineTune(lm, FT).edit(CURIE)
    with torch.no_grad():
        assert target_loss(lm, CURIE.prompt, CURIE.target).item() < nll0
    edit.restore(lm.model)
    eps = 1e-3
    FineTune(lm, FtParams(**{**FT.to_dict(), "linf": eps})).edit(CURIE)
    moved = (weight_out_in(lm.model, edited_module_name(lm.model, EDIT_LAYER)) - w0).abs().max().item()
    assert 0 < moved <= eps + 1e-7  # float32 rounding of θ₀ ± ε


def test_ft_early_stop_takes_no_step_when_the_target_is_already_likely(tiny_lm):
    lm = tiny_lm("gpt2")
    w0 = edited_module(lm.model, EDIT_LAYER).weight.detach().clone()
    edit = FineTune(lm, FtParams(layer=EDIT_LAYER, early_stop_loss=1e9)).edit(CURIE)
    assert edit.info["steps"] == 1
    assert torch.equal(edited_module(lm.model, EDIT_LAYER).weight, w0)


@pytest.mark.parametrize("model_type", ARCHS)
def test_cached_integrated_gradients_equal_the_direct_computation(tiny_lm, model_type):
    lm = tiny_lm(model_type)
    prompt, token, steps = CURIE.prompt, 7, 3
    got = neuron_attributions(lm, prompt, token, [0, EDIT_LAYER], steps)  # (2, d_in)
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    for row, layer in enumerate([0, EDIT_LAYER]):
        a = last_token_keys(lm, prompt, [layer])[layer]
        grad = torch.zeros_like(a)
        for i in range(1, steps + 1):
            x = (i / steps * a).clone().requires_grad_(True)

            def swap(_m, args, x=x):
                h = args[0].clone()
                h[0, -1] = x
                return (h,)

            hook = edited_module(lm.model, layer).register_forward_pre_hook(swap)
            p = logits_at(lm.model, final_hidden(lm.model, ids, torch.ones_like(ids))[0, -1]).softmax(-1)[token]
            grad += torch.autograd.grad(p, [x])[0]
            hook.remove()
        torch.testing.assert_close(got[row], a * grad / steps, atol=1e-6, rtol=1e-4)


def test_kn_edits_only_the_selected_neurons(tiny_lm):
    lm = tiny_lm("llama")
    before = state(lm.model)
    edit = KnowledgeNeurons(lm, KnParams(ig_steps=4, max_neurons=3, threshold=0.0, scale=1.0)).edit(CURIE)
    neurons = edit.info["neurons"]
    assert len(neurons) == 3
    for name, original in edit.originals.items():
        diff = (weight_out_in(lm.model, name) - original).abs().sum(0)  # (d_in,) change per neuron
        layer = int(name.split(".")[2])
        assert set(torch.nonzero(diff).flatten().tolist()) == {j for l, j in neurons if l == layer}
    assert before  # (restore is covered above)


def test_method_params_from_params_sections():
    from romeflow.params import ConfigError, parse_params

    sections = {"ft": {"layer": 2, "lr": 0.001}, "ftl": {"linf": 0.01}, "kn": {"layers": [1, 2], "scale": 0.5},
                "rome": ROME.to_dict()}
    p = parse_params(sections)
    assert p.method("ft").layer == 2
    assert p.method("ftl").linf == 0.01
    assert p.method("kn").layers == (1, 2)
    assert p.method("rome") == ROME
    with pytest.raises(ConfigError, match="ftl.linf: required"):
        parse_params({}).method("ftl")
    with pytest.raises(ConfigError, match="ft.lr_typo: unknown field"):
        parse_params({"ft": {"lr_typo": 1}})
    with pytest.raises(ConfigError, match="unknown method 'mend'"):
        p.method("mend")
    with pytest.raises(ValueError, match="unknown method"):
        make_editor("mend", None, None, None)


def test_the_method_table_names_each_editor_its_section_and_params_class():
    """One row a method: its params.yaml section is a field of Params of that row's class, and
    Params.method reads it through the row (rome-r1: the rank-one insert of the rome section)."""
    from dataclasses import fields as dc_fields

    from romeflow.engine.editors import METHOD_TABLE, METHODS
    from romeflow.engine.inserts import INSERTS
    from romeflow.params import Params

    assert METHODS == tuple(METHOD_TABLE) and {"rome", "rome-r1", "ft", "ftl", "kn"} <= set(METHODS)
    from dataclasses import replace

    params = Params()
    params = replace(params, rome=replace(params.rome, insert="family"))  # as params.yaml
    types = {f.name: f for f in dc_fields(Params)}
    for name, method in METHOD_TABLE.items():
        assert method.section in types, name
        assert isinstance(getattr(params, method.section), method.params), name
    assert params.method("rome") == params.rome
    assert params.method("rome-r1") == replace(params.rome, insert="rank-one") != params.rome
    for name in INSERTS:  # every named insert is a method: ROME with rome.insert set
        assert params.method(name) == replace(params.rome, insert=name)
    assert params.method("kn") is params.kn
